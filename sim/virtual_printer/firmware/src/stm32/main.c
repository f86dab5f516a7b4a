// STM32 board entry (host-compiled on the bench).
#include "../main_common.h"

#ifdef CONFIG_FIXTURE_DICT_MCU
DECL_CONSTANT_STR("MCU", CONFIG_FIXTURE_DICT_MCU); // a test knob: the wrong MCU
#else
DECL_CONSTANT_STR("MCU", CONFIG_MCU);
#endif
DECL_CONSTANT("FLASH_APPLICATION_ADDRESS", CONFIG_FLASH_APPLICATION_ADDRESS);
DECL_ENUMERATION_RANGE("pin", "PA0", 0, 16);
DECL_ENUMERATION_RANGE("pin", "PB0", 16, 16);
DECL_ENUMERATION_RANGE("pin", "PC0", 32, 16);
DECL_ENUMERATION_RANGE("pin", "PD0", 48, 16);
DECL_ENUMERATION_RANGE("pin", "PE0", 64, 16);

int main(int argc, char **argv) { return main_common(argc, argv); }
