// Synchronised triggers that stop steppers (homing, probing).
#include "command.h"

DECL_COMMAND(command_config_trsync, "config_trsync oid=%c");
DECL_COMMAND(command_trsync_start,
             "trsync_start oid=%c report_clock=%u report_ticks=%u"
             " expire_reason=%c");
DECL_COMMAND(command_trsync_set_timeout, "trsync_set_timeout oid=%c clock=%u");
DECL_COMMAND(command_trsync_trigger, "trsync_trigger oid=%c reason=%c");
DECL_RESPONSE("trsync_state oid=%c can_trigger=%c trigger_reason=%c clock=%u");
DECL_STATIC_STR("Can't add signal that is already active");
