/*
 * board.h on QEMU mps2-an386 (Cortex-M4F, 25 MHz system clock).
 *
 * UART0: the CMSDK APB UART at 0x40004000, polled. Instructions: SysTick on the processor clock
 * (CLKSOURCE = 1; QEMU's mps2 wires sysclk, 25 MHz, to the SysTick "cpuclk" input and a 1 MHz
 * clock to "refclk"), so one tick is 40 ns = 40 instructions under -icount shift=0. Measured:
 * a loop of 10 M instructions counts 250,000 ticks with CLKSOURCE = 1 and 10,000 with 0. Flash: the top
 * 1 MiB of code memory at 0x00300000, which QEMU models as RAM; when the semihosting command line
 * carries "flash=PATH", every write is mirrored into that host file at the same offset (the
 * runner loads the file at 0x00300000 at start, so the region survives a restart).
 */
#include <string.h>

#include "board.h"
#include "semihost.h"
#include "systick.h"

#define UART0_BASE 0x40004000u
#define UART_DATA (*(volatile uint32_t *)(UART0_BASE + 0x00u))
#define UART_STATE (*(volatile uint32_t *)(UART0_BASE + 0x04u))
#define UART_CTRL (*(volatile uint32_t *)(UART0_BASE + 0x08u))
#define UART_BAUDDIV (*(volatile uint32_t *)(UART0_BASE + 0x10u))
#define UART_STATE_TX_FULL 1u
#define UART_STATE_RX_FULL 2u
#define UART_CTRL_TX_RX_ENABLE 3u

#define SYSCLK_HZ 25000000u
#define BAUD 115200u
#define NS_PER_TICK (1000000000u / SYSCLK_HZ)

#define FLASH_BASE 0x00300000u
#define FLASH_SIZE 0x00100000u
#define FLASH_ARG "flash="

static int flash_file = -1; /* semihosting handle of the backing file, -1: memory only */

/* The backing file named by a "flash=PATH" argument on the semihosting command line, opened for
 * update. (Scanned by hand: newlib's strtok would pull in stdio.) */
static void open_flash_file(void) {
    static char line[256];
    char *arg = line;
    if (sh_get_cmdline(line, sizeof line) < 0) return;
    while (*arg != '\0') {
        size_t len = strcspn(arg, " ");
        char *next = arg[len] == '\0' ? arg + len : arg + len + 1;
        arg[len] = '\0';
        if (strncmp(arg, FLASH_ARG, strlen(FLASH_ARG)) == 0) {
            flash_file = sh_open(arg + strlen(FLASH_ARG), SH_MODE_R_PLUS_B);
            if (flash_file < 0) sh_write0("board: cannot open the flash= file; flash writes are not persisted\n");
            return;
        }
        arg = next;
    }
}

void board_init(void) {
    UART_BAUDDIV = SYSCLK_HZ / BAUD;
    UART_CTRL = UART_CTRL_TX_RX_ENABLE;
    systick_start(SYSTICK_CLOCK_CPU);
    open_flash_file();
}

const char *board_name(void) { return "mps2-an386"; }

int board_uart_getc(void) { return (UART_STATE & UART_STATE_RX_FULL) ? (int)(UART_DATA & 0xFFu) : -1; }

void board_uart_write(const uint8_t *data, size_t len) {
    size_t i;
    for (i = 0; i < len; i++) {
        while (UART_STATE & UART_STATE_TX_FULL) {
        }
        UART_DATA = data[i];
    }
}

uint64_t board_instructions(void) { return systick_ticks() * NS_PER_TICK; }

uint32_t board_instructions_per_tick(void) { return NS_PER_TICK; }

uint32_t board_millis(void) { return (uint32_t)(board_instructions() / 1000000u); }

const uint8_t *board_flash_base(void) { return (const uint8_t *)FLASH_BASE; }

uint32_t board_flash_size(void) { return FLASH_SIZE; }

int board_flash_write(uint32_t offset, const uint8_t *data, size_t len) {
    if (data == NULL || offset > FLASH_SIZE || len > FLASH_SIZE - offset) return -1;
    memcpy((uint8_t *)FLASH_BASE + offset, data, len);
    if (flash_file < 0) return 0;
    if (sh_seek(flash_file, offset) != 0 || sh_write(flash_file, data, len) != 0) return -1;
    return 0;
}

void board_puts(const char *text) { sh_write0(text); }

void board_exit(int code) { sh_exit(code); }
