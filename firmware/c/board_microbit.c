/*
 * board.h on QEMU microbit (nRF51822, Cortex-M0, 16 MHz).
 *
 * UART0: the nRF51 UART at 0x40002000, polled (TXD write, wait for EVENTS_TXDRDY). Instructions:
 * SysTick on the processor clock (CLKSOURCE = 1): QEMU's nRF51 SoC connects only the 16 MHz
 * "cpuclk" input (the real nRF51 has no SysTick; QEMU's ARMv7-M container always provides one),
 * so one tick is 62.5 ns = 62.5 instructions under -icount shift=0. Measured: a loop of 10 M
 * instructions counts 160,000 ticks, with CLKSOURCE = 1 and (no reference clock here) with 0 too. No persistent flash: this
 * board is for measurement only, board_flash_write returns -1.
 */
#include "board.h"
#include "semihost.h"
#include "systick.h"

#define UART0_BASE 0x40002000u
#define UART_REG(offset) (*(volatile uint32_t *)(UART0_BASE + (offset)))
#define UART_TASKS_STARTRX UART_REG(0x000u)
#define UART_TASKS_STARTTX UART_REG(0x008u)
#define UART_EVENTS_RXDRDY UART_REG(0x108u)
#define UART_EVENTS_TXDRDY UART_REG(0x11Cu)
#define UART_ENABLE UART_REG(0x500u)
#define UART_RXD UART_REG(0x518u)
#define UART_TXD UART_REG(0x51Cu)
#define UART_BAUDRATE UART_REG(0x524u)
#define UART_ENABLE_ON 4u
#define UART_BAUDRATE_115200 0x01D7E000u

/* 62.5 ns per tick: instructions = ticks x 125 / 2 (rounded down). */
#define NS_PER_TWO_TICKS 125u

void board_init(void) {
    UART_BAUDRATE = UART_BAUDRATE_115200;
    UART_ENABLE = UART_ENABLE_ON;
    UART_TASKS_STARTTX = 1u;
    UART_TASKS_STARTRX = 1u;
    systick_start(SYSTICK_CLOCK_CPU);
}

const char *board_name(void) { return "microbit"; }

int board_uart_getc(void) {
    if (!UART_EVENTS_RXDRDY) return -1;
    UART_EVENTS_RXDRDY = 0u;
    return (int)(UART_RXD & 0xFFu);
}

void board_uart_write(const uint8_t *data, size_t len) {
    size_t i;
    for (i = 0; i < len; i++) {
        UART_EVENTS_TXDRDY = 0u;
        UART_TXD = data[i];
        while (!UART_EVENTS_TXDRDY) {
        }
    }
}

uint64_t board_instructions(void) { return systick_ticks() * NS_PER_TWO_TICKS / 2u; }

/* 62.5 rounded up: the resolution is never better than this. */
uint32_t board_instructions_per_tick(void) { return (NS_PER_TWO_TICKS + 1u) / 2u; }

uint32_t board_millis(void) { return (uint32_t)(board_instructions() / 1000000u); }

const uint8_t *board_flash_base(void) { return NULL; }

uint32_t board_flash_size(void) { return 0u; }

int board_flash_write(uint32_t offset, const uint8_t *data, size_t len) {
    (void)offset;
    (void)data;
    (void)len;
    return -1;
}

void board_puts(const char *text) { sh_write0(text); }

void board_exit(int code) { sh_exit(code); }
