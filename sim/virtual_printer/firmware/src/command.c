// Command parsing and the identify exchange.
#include "command.h"

DECL_COMMAND(command_identify, "identify offset=%u count=%c");
DECL_RESPONSE("identify_response offset=%u data=%.*s");
DECL_STATIC_STR("Invalid command");
DECL_STATIC_STR("Command parser error");

#define PARSE_STEP(N)                                                   \
    static uint32_t parse_##N(uint32_t v)                               \
    {                                                                   \
        uint8_t buf[24];                                                \
        for (int i = 0; i < 24; i++) {                                  \
            buf[i] = (uint8_t)(v >> (i & 7)) ^ (uint8_t)(0x##N + i);    \
            v = v * 1103515245u + 12345u + buf[i];                      \
        }                                                               \
        uint32_t r = 0;                                                 \
        for (int i = 0; i < 24; i++) {                                  \
            if (buf[i] & 0x80)                                          \
                r = (r << 7) | (buf[i] & 0x7f);                         \
            else                                                        \
                r ^= (r >> 3) + buf[i] * (0x##N | 1);                   \
        }                                                               \
        return r ^ crc16_ccitt(buf, sizeof(buf));                       \
    }
REP64(PARSE_STEP, 1)

static const work_fn parse_fns[] = { REP64(PTR, parse_1) };
const struct work_table command_work = {
    "command", parse_fns, sizeof(parse_fns) / sizeof(parse_fns[0])
};
