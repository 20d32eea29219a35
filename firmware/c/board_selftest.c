/*
 * The board self-test image: board.h on the emulated board against what the host observes.
 *
 * UART: echoes every byte it receives until a newline (or 200 ms of virtual time without one),
 * upper-casing letters, then writes "<board> uart ok\n". The line "fault" instead executes an
 * undefined instruction: startup.c's fault handler must report it and exit with status 3. Flash (boards that have it): reads a
 * counter record at FLASH_TEST_OFFSET, prints "flash count=<n>" (0 when absent), writes n + 1,
 * and checks that a write past the end is refused. Exits 0, or 1 on a failed check.
 */
#include <stdint.h>
#include <string.h>

#include "board.h"

#define FLASH_TEST_OFFSET 0x00080000u
#define FLASH_TEST_MAGIC 0x54534C46u /* "FLST" */
#define ECHO_TIMEOUT_MS 200u

static void put_line(const char *prefix, uint32_t value) {
    char digits[11], text[64];
    int n = 0;
    size_t len = strlen(prefix);
    do {
        digits[n++] = (char)('0' + (int)(value % 10u));
        value /= 10u;
    } while (value != 0u);
    memcpy(text, prefix, len);
    while (n > 0) text[len++] = digits[--n];
    text[len++] = '\n';
    text[len] = '\0';
    board_puts(text);
}

/* Echo one line; returns its length (the newline excluded, at most sizeof line - 1 kept), -1 on timeout. */
static int echo_line(char *line, size_t size) {
    uint32_t started = board_millis();
    size_t len = 0;
    for (;;) {
        int c = board_uart_getc();
        uint8_t byte;
        if (c < 0) {
            if (board_millis() - started > ECHO_TIMEOUT_MS) return -1;
            continue;
        }
        byte = (uint8_t)(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
        board_uart_write(&byte, 1u);
        if (c == '\n') {
            line[len] = '\0';
            return (int)len;
        }
        if (len + 1u < size) line[len++] = (char)c;
    }
}

static int flash_counter(void) {
    uint32_t record[2] = {0u, 0u};
    const uint8_t one = 0u;
    if (board_flash_size() == 0u) return board_flash_write(0u, &one, 1u) == -1 ? 0 : -1;
    memcpy(record, board_flash_base() + FLASH_TEST_OFFSET, sizeof record);
    if (record[0] != FLASH_TEST_MAGIC) record[1] = 0u;
    put_line("flash count=", record[1]);
    record[0] = FLASH_TEST_MAGIC;
    record[1]++;
    if (board_flash_write(FLASH_TEST_OFFSET, (const uint8_t *)record, sizeof record) != 0) return -1;
    if (memcmp(board_flash_base() + FLASH_TEST_OFFSET, record, sizeof record) != 0) return -1;
    if (board_flash_write(board_flash_size() - 4u, (const uint8_t *)record, sizeof record) != -1) return -1;
    return 0;
}

int main(void) {
    static const char ok[] = " uart ok\n";
    char line[16];
    board_init();
    if (echo_line(line, sizeof line) < 0) {
        board_puts("uart: no line within the timeout\n");
        board_exit(1);
    }
    if (strcmp(line, "fault") == 0) __asm__ volatile("udf #0");
    board_uart_write((const uint8_t *)board_name(), strlen(board_name()));
    board_uart_write((const uint8_t *)ok, sizeof ok - 1u);
    if (flash_counter() != 0) {
        board_puts("flash: check failed\n");
        board_exit(1);
    }
    board_puts("selftest done\n");
    board_exit(0);
    return 0;
}
