# Test-only klippy plugin: drive the REAL print_stats object's state machine
# (note_start / note_pause / reset, exactly what virtual_sdcard calls) so a
# test can hold the printer in "printing" in file-output mode, where a real
# print finishes instantly.


class TestPrint:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.print_stats = self.printer.load_object(config, "print_stats")
        gcode = self.printer.lookup_object("gcode")
        gcode.register_command("TEST_PRINT_STATE", self.cmd_TEST_PRINT_STATE,
                               desc="test only: set print_stats state")

    def cmd_TEST_PRINT_STATE(self, gcmd):
        state = gcmd.get("STATE")
        if state == "printing":
            self.print_stats.note_start()
        elif state == "paused":
            self.print_stats.note_pause()
        elif state == "standby":
            self.print_stats.reset()
        else:
            raise gcmd.error("STATE must be printing, paused or standby")


def load_config(config):
    return TestPrint(config)
