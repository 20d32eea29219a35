/*
 * Vector table and reset handler of the QEMU images (Cortex-M4F on mps2-an386, Cortex-M0 on
 * microbit). The reset handler copies .data from its load address, zeroes .bss, enables the FPU
 * where the core has one (CPACR: CP10/CP11 full access, before any float instruction runs) and
 * calls main. A fault or an unexpected interrupt is reported through semihosting and ends the
 * emulation with a non-zero status, so a crash fails a test instead of hanging it.
 *
 * Built with -DSTARTUP_MAIN_ARGS for images linked with newlib's rdimon (stdio over semihosting):
 * their main(argc, argv) gets the semihosting command line, as a hosted main would.
 */
#include <stdint.h>

#include "semihost.h"

#define EXIT_FAULT 3
#define SCB_CPACR (*(volatile uint32_t *)0xE000ED88u)
#define SCB_CFSR (*(volatile uint32_t *)0xE000ED28u)
#define SCB_HFSR (*(volatile uint32_t *)0xE000ED2Cu)

/* Linker script symbols (boards/<board>.ld). */
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

#ifdef STARTUP_MAIN_ARGS
#define MAX_ARGS 8
extern int main(int argc, char **argv);
extern void initialise_monitor_handles(void);
#else
extern int main(void);
#endif

void Reset_Handler(void);
void HardFault_Handler(void);
void Default_Handler(void);
/* The board files define SysTick_Handler to count SysTick overflows; an image without one faults. */
void SysTick_Handler(void) __attribute__((weak, alias("Default_Handler")));
void NMI_Handler(void) __attribute__((weak, alias("Default_Handler")));

typedef void (*vector_t)(void);

/* 16 core exceptions and 32 external interrupts: enough for both boards' peripherals. */
__attribute__((section(".isr_vector"), used)) static const vector_t vectors[16 + 32] = {
    (vector_t)(uintptr_t)&_estack, /* initial main stack pointer */
    Reset_Handler,
    NMI_Handler,
    HardFault_Handler,
    Default_Handler, /* MemManage (M3/M4) */
    Default_Handler, /* BusFault (M3/M4) */
    Default_Handler, /* UsageFault (M3/M4) */
    0, 0, 0, 0,
    Default_Handler, /* SVCall */
    Default_Handler, /* DebugMonitor */
    0,
    Default_Handler, /* PendSV */
    SysTick_Handler,
    [16 ... 47] = Default_Handler,
};

#ifdef STARTUP_MAIN_ARGS
/* Split the semihosting command line at spaces into argv (no quoting: the runner passes plain paths). */
static int command_line_args(char **argv) {
    static char line[256];
    int argc = 0;
    char *p = line;
    if (sh_get_cmdline(line, sizeof line) < 0) return 0;
    while (*p != '\0' && argc < MAX_ARGS) {
        while (*p == ' ') *p++ = '\0';
        if (*p == '\0') break;
        argv[argc++] = p;
        while (*p != '\0' && *p != ' ') p++;
    }
    return argc;
}
#endif

void Reset_Handler(void) {
    const uint32_t *src = &_sidata;
    uint32_t *dst;
    for (dst = &_sdata; dst < &_edata;) *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;) *dst++ = 0u;
#if defined(__ARM_FP)
    SCB_CPACR |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
#endif
#ifdef STARTUP_MAIN_ARGS
    {
        static char *argv[MAX_ARGS + 1];
        int argc = command_line_args(argv);
        initialise_monitor_handles();
        sh_exit(main(argc, argv));
    }
#else
    sh_exit(main());
#endif
}

static void put_hex(char *out, uint32_t value) {
    static const char digits[] = "0123456789abcdef";
    int i;
    for (i = 7; i >= 0; i--) {
        out[i] = digits[value & 0xFu];
        value >>= 4;
    }
}

/* frame: the exception stack frame (r0-r3, r12, lr, pc, xpsr). */
__attribute__((used)) static void fault_report(const uint32_t *frame) {
    static char text[] = "fault: ipsr=xxxxxxxx pc=xxxxxxxx lr=xxxxxxxx cfsr=xxxxxxxx hfsr=xxxxxxxx\n";
    uint32_t ipsr;
    __asm__ volatile("mrs %0, ipsr" : "=r"(ipsr));
    put_hex(text + 12, ipsr);
    put_hex(text + 24, frame[6]);
    put_hex(text + 36, frame[5]);
#if __ARM_ARCH >= 7 /* the configurable fault status registers exist from ARMv7-M on */
    put_hex(text + 50, SCB_CFSR);
    put_hex(text + 64, SCB_HFSR);
#else
    text[44] = '\n';
    text[45] = '\0';
#endif
    sh_write0(text);
    sh_exit(EXIT_FAULT);
}

/* The images never switch to the process stack, so the frame is on the main stack. */
__attribute__((naked)) void HardFault_Handler(void) {
    __asm__ volatile("mrs r0, msp\n\tldr r1, =fault_report\n\tbx r1\n");
}

void Default_Handler(void) __attribute__((alias("HardFault_Handler")));
