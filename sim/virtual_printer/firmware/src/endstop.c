// End stops (commands only: the virtual MCU samples its virtual switches).
#include "command.h"

DECL_COMMAND(command_config_endstop, "config_endstop oid=%c pin=%c pull_up=%c");
DECL_COMMAND(command_endstop_home,
             "endstop_home oid=%c clock=%u sample_ticks=%u sample_count=%c"
             " rest_ticks=%u pin_value=%c trsync_oid=%c trigger_reason=%c");
DECL_COMMAND(command_endstop_query_state, "endstop_query_state oid=%c");
DECL_RESPONSE("endstop_state oid=%c homing=%c next_clock=%u pin_value=%c");
