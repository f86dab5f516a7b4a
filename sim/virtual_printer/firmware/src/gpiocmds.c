// Digital outputs (stepper enable pins).
#include "command.h"

DECL_COMMAND(command_config_digital_out,
             "config_digital_out oid=%c pin=%u value=%c default_value=%c"
             " max_duration=%u");
DECL_COMMAND(command_queue_digital_out,
             "queue_digital_out oid=%c clock=%u on_ticks=%u");
DECL_COMMAND(command_update_digital_out, "update_digital_out oid=%c value=%c");
