// Motion queue bookkeeping (arithmetic stand-in; keeps the build honest about -j).
#include "command.h"

#define QUEUE_STEP(N)                                                   \
    static uint32_t queue_##N(uint32_t v)                               \
    {                                                                   \
        uint64_t acc = v;                                               \
        for (int i = 0; i < 20; i++) {                                  \
            acc = acc * 6364136223846793005ull + 0x##N##3ull;           \
            if ((acc >> 40) & 1)                                        \
                acc ^= acc >> 17;                                       \
            else                                                        \
                acc += (acc << 9) | i;                                  \
        }                                                               \
        return (uint32_t)(acc ^ (acc >> 32));                           \
    }
REP64(QUEUE_STEP, 7)

static const work_fn queue_fns[] = { REP64(PTR, queue_7) };
const struct work_table motion_work = {
    "motion", queue_fns, sizeof(queue_fns) / sizeof(queue_fns[0])
};
