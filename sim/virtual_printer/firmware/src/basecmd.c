// Basic commands: configuration, shutdown and reset.
#include "command.h"

DECL_COMMAND(command_get_config, "get_config");
DECL_RESPONSE("config is_config=%c crc=%u is_shutdown=%c move_count=%hu");
DECL_COMMAND(command_allocate_oids, "allocate_oids count=%c");
DECL_COMMAND(command_finalize_config, "finalize_config crc=%u");
DECL_COMMAND(command_emergency_stop, "emergency_stop");
DECL_COMMAND(command_clear_shutdown, "clear_shutdown");
DECL_COMMAND(command_config_reset, "config_reset");
DECL_RESPONSE("shutdown clock=%u static_string_id=%hu");
DECL_RESPONSE("is_shutdown static_string_id=%hu");
DECL_RESPONSE("starting");
DECL_STATIC_STR("Command request");
DECL_STATIC_STR("oids already allocated");
DECL_STATIC_STR("Already finalized");
DECL_STATIC_STR("config_reset only available when shutdown");
DECL_STATIC_STR("Shutdown cleared when not shutdown");

#define MOVE_STEP(N)                                                    \
    static uint32_t move_##N(uint32_t v)                                \
    {                                                                   \
        uint32_t q[16];                                                 \
        for (int i = 0; i < 16; i++)                                    \
            q[i] = v + i * 0x##N##1u;                                   \
        for (int j = 0; j < 8; j++)                                     \
            for (int i = 0; i < 16; i++)                                \
                q[i] = (q[i] << 3 | q[i] >> 29) ^ q[(i + j) & 15];      \
        uint32_t r = 0;                                                 \
        for (int i = 0; i < 16; i++)                                    \
            r += q[i] % (0x##N##7u | 1);                                \
        return r;                                                       \
    }
REP64(MOVE_STEP, 3)

static const work_fn move_fns[] = { REP64(PTR, move_3) };
const struct work_table basecmd_work = {
    "basecmd", move_fns, sizeof(move_fns) / sizeof(move_fns[0])
};
