// Step timing (the bench's arithmetic stand-in for Klipper's stepper code).
#include "command.h"

#define STEP_STEP(N)                                                    \
    static uint32_t step_##N(uint32_t interval)                         \
    {                                                                   \
        int32_t add = (int32_t)(interval ^ 0x##N##5u);                  \
        uint32_t next = interval;                                       \
        for (int c = 0; c < 32; c++) {                                  \
            next += interval;                                           \
            interval += add;                                            \
            if ((int32_t)interval < 0)                                  \
                interval = -interval;                                   \
            add = (add >> 1) ^ (int32_t)(next * 0x##N##9u);             \
            switch (c & 3) {                                            \
            case 0: next ^= next >> 11; break;                          \
            case 1: next += next << 5; break;                           \
            case 2: next ^= interval; break;                            \
            default: next = ~next; break;                               \
            }                                                           \
        }                                                               \
        return next;                                                    \
    }
REP64(STEP_STEP, 5)

static const work_fn step_fns[] = { REP64(PTR, step_5) };
const struct work_table stepper_work = {
    "stepper", step_fns, sizeof(step_fns) / sizeof(step_fns[0])
};
