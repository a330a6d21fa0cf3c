/* Cortex-M startup for graphc's firmware on QEMU boards with semihosting.
 *
 * Reset: enable the FPU (hard-float builds), copy .data from flash, zero .bss, fill the
 * free RAM between the heap and the stack with a pattern, open semihosting stdio,
 * run main(). After main: report the stack high-water mark and the heap size on the
 * host's stderr, fail if the stack reached the heap, and exit with main's status
 * (QEMU exits with it). Any fault also ends QEMU, with status 1, instead of hanging. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define FREE_PATTERN 0xA5C3A5C3u

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack, end;
extern int main(void);
extern void initialise_monitor_handles(void); /* librdimon: semihosting stdio */
extern void __libc_init_array(void);
extern void *_sbrk(ptrdiff_t increment);      /* librdimon's heap */

void Reset_Handler(void);
void Fault_Handler(void);
/* -nostartfiles leaves out crti.o/crtn.o, but newlib's init/fini arrays still call these. */
void _init(void);
void _fini(void);
void _init(void) {}
void _fini(void) {}

static uintptr_t semihost(uintptr_t op, uintptr_t arg)
{
    register uintptr_t r0 __asm__("r0") = op;
    register uintptr_t r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static void write0(const char *text)
{
    semihost(0x04u, (uintptr_t)text); /* SYS_WRITE0: to the host's stderr under QEMU */
}

static void write_number(unsigned long value)
{
    char digits[12];
    char *p = digits + sizeof digits - 1;
    *p = '\0';
    do {
        *--p = (char)('0' + value % 10u);
        value /= 10u;
    } while (value);
    write0(p);
}

void Fault_Handler(void)
{
    write0("graphc: Cortex-M fault or unexpected exception\n");
    semihost(0x18u, 0x20023u); /* SYS_EXIT, ADP_Stopped_RunTimeErrorUnknown: QEMU exits 1 */
    for (;;) {
    }
}

__attribute__((section(".isr_vector"), used))
void (*const graphc_vectors[16])(void) = {
    (void (*)(void))(uintptr_t)&_estack, /* initial stack pointer */
    Reset_Handler,
    Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler, /* NMI..Usage */
    Fault_Handler, 0, 0, 0,           /* SecureFault (v8-M), reserved */
    Fault_Handler, Fault_Handler, 0,  /* SVCall, DebugMonitor, reserved */
    Fault_Handler, Fault_Handler      /* PendSV, SysTick (graphc polls SysTick, no IRQ) */
};

void Reset_Handler(void)
{
    uint32_t *src = &_sidata, *dst, *sp;
    int status;
#if defined(__ARM_FP)
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: CP10, CP11 full access */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
#endif
    for (dst = &_sdata; dst < &_edata; ++dst) {
        *dst = *src++;
    }
    for (dst = &_sbss; dst < &_ebss; ++dst) {
        *dst = 0u;
    }
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (dst = &end; dst < sp - 64; ++dst) { /* up to just below this frame */
        *dst = FREE_PATTERN;
    }
    initialise_monitor_handles();
    __libc_init_array();
    status = main();
    {
        uint32_t *heap_top = (uint32_t *)(((uintptr_t)_sbrk(0) + 3u) & ~(uintptr_t)3u);
        uint32_t *p = heap_top;
        while (p < &_estack && *p == FREE_PATTERN) {
            ++p;
        }
        write0("graphc: stack ");
        write_number((unsigned long)((uintptr_t)&_estack - (uintptr_t)p));
        write0(" bytes, heap ");
        write_number((unsigned long)((uintptr_t)heap_top - (uintptr_t)&end));
        write0(" bytes\n");
        if (p == heap_top) { /* not one untouched word left between them */
            write0("graphc: the stack reached the heap\n");
            status = 1;
        }
    }
    exit(status);
}
