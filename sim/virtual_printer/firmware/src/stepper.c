// Step timing (the bench's arithmetic stand-in for Klipper's stepper code).
// The commands are Klipper's: the virtual MCU (virtual_printer/motion.py) runs them.
#include "command.h"

DECL_COMMAND(command_config_stepper, "config_stepper oid=%c step_pin=%c"
             " dir_pin=%c invert_step=%c step_pulse_ticks=%u");
DECL_COMMAND(command_queue_step, "queue_step oid=%c interval=%u count=%hu add=%hi");
DECL_COMMAND(command_set_next_step_dir, "set_next_step_dir oid=%c dir=%c");
DECL_COMMAND(command_reset_step_clock, "reset_step_clock oid=%c clock=%u");
DECL_COMMAND(command_stepper_get_position, "stepper_get_position oid=%c");
DECL_RESPONSE("stepper_position oid=%c pos=%i");
DECL_COMMAND(command_stepper_stop_on_trigger,
             "stepper_stop_on_trigger oid=%c trsync_oid=%c");
DECL_STATIC_STR("Invalid count parameter");
DECL_STATIC_STR("Can't reset time when stepper active");

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
