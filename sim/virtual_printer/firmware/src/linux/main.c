// Linux-process MCU entry: the virtual klipper_mcu reads this binary's dictionary.
#include "../main_common.h"

DECL_CONSTANT_STR("MCU", "linux");

int main(int argc, char **argv) { return main_common(argc, argv); }
