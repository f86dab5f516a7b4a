// CRC-16/MCRF4XX, Klipper's crc16_ccitt.
#include "command.h"

uint16_t
crc16_ccitt(const uint8_t *buf, unsigned len)
{
    uint16_t crc = 0xffff;
    while (len--) {
        uint8_t data = *buf++;
        data ^= crc & 0xff;
        data ^= data << 4;
        crc = ((((uint16_t)data << 8) | (crc >> 8)) ^ (uint8_t)(data >> 4)
               ^ ((uint16_t)data << 3));
    }
    return crc;
}
