// The entry point shared by every board directory.
#include <stdio.h>
#include <string.h>
#include "command.h"

extern const struct work_table command_work, basecmd_work, stepper_work,
    motion_work;

static int
main_common(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("%s\n", command_version);
        return 0;
    }
    const struct work_table *tables[] = {
        &command_work, &basecmd_work, &stepper_work, &motion_work
    };
    uint32_t seed = command_identify_size;
    for (unsigned i = 0; i < 4; i++)
        seed = sched_run(tables[i], seed);
    printf("%s %u\n", command_version, (unsigned)seed);
    return 0;
}
