// Compile-time requests: how sources declare commands, responses and constants.
// Each macro leaves a string in the .compile_time_request section; the build turns
// them into the data dictionary (scripts/buildcommands.py).
#ifndef __COMMAND_H
#define __COMMAND_H

#include <stdint.h>

#define __stringify_1(x) #x
#define __stringify(x) __stringify_1(x)
#define __PASTE_1(a, b) a##b
#define __PASTE(a, b) __PASTE_1(a, b)

#define DECL_CTR(REQUEST)                                              \
    static char __PASTE(_DECLS_, __LINE__)[]                           \
        __attribute__((used, section(".compile_time_request"))) = REQUEST

#define DECL_COMMAND(FUNC, FMT) DECL_CTR("_DECL_COMMAND " #FUNC " " FMT)
#define DECL_RESPONSE(FMT) DECL_CTR("_DECL_RESPONSE " FMT)
#define DECL_CONSTANT(NAME, VALUE) \
    DECL_CTR("_DECL_CONSTANT " NAME " " __stringify(VALUE))
#define DECL_CONSTANT_STR(NAME, VALUE) \
    DECL_CTR("_DECL_CONSTANT " NAME " \"" VALUE "\"")
#define DECL_ENUMERATION(ENUM, NAME, VALUE) \
    DECL_CTR("_DECL_ENUMERATION " ENUM " " NAME " " __stringify(VALUE))
#define DECL_ENUMERATION_RANGE(ENUM, NAME, VALUE, COUNT)              \
    DECL_CTR("_DECL_ENUMERATION_RANGE " ENUM " " NAME " "               \
             __stringify(VALUE) " " __stringify(COUNT))
#define DECL_STATIC_STR(TEXT) DECL_CTR("_DECL_STATIC_STR " TEXT)

// Generated at link time (compile_time_request.c)
extern const char command_version[];
extern const uint8_t command_identify_data[];
extern const uint32_t command_identify_size;

// "Work" the scheduler runs: every module registers a table of steps.
typedef uint32_t (*work_fn)(uint32_t);
struct work_table { const char *name; const work_fn *fns; unsigned count; };
uint32_t sched_run(const struct work_table *t, uint32_t seed);
uint16_t crc16_ccitt(const uint8_t *buf, unsigned len);

// Code generators (enough real code that compiling takes measurable CPU time).
#define REP4(M, P) M(P##0) M(P##1) M(P##2) M(P##3)
#define REP16(M, P) REP4(M, P##0) REP4(M, P##1) REP4(M, P##2) REP4(M, P##3)
#define REP64(M, P) REP16(M, P##0) REP16(M, P##1) REP16(M, P##2) REP16(M, P##3)
#define PTR(N) N,

#endif
