// Scheduler: runs the work tables (the bench's stand-in for Klipper's timers).
#include "command.h"

#ifdef CONFIG_FIXTURE_FAIL
#error "fixture failure requested"
#endif

uint32_t
sched_run(const struct work_table *t, uint32_t seed)
{
    for (unsigned i = 0; i < t->count; i++)
        seed = t->fns[i](seed ^ i);
    return seed;
}

DECL_CONSTANT("STATS_SUMSQ_BASE", CONFIG_STATS_SUMSQ_BASE);
DECL_RESPONSE("stats count=%u sum=%u sumsq=%u");
DECL_COMMAND(command_get_uptime, "get_uptime");
DECL_RESPONSE("uptime high=%u clock=%u");
DECL_COMMAND(command_get_clock, "get_clock");
DECL_RESPONSE("clock clock=%u");
DECL_CONSTANT("CLOCK_FREQ", CONFIG_CLOCK_FREQ);
DECL_STATIC_STR("Timer too close");
DECL_STATIC_STR("Invalid oid type");
