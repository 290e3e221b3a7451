/* The KVM probe guest (see accel.py). Assemble: as --32 kvm_probe.S -o p.o && objcopy -O binary p.o p.bin */
    .code16
_start:                         /* linked at 0xf0000, the low alias of the 64 KiB BIOS */
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl %cs:(gdt_desc - _start)
    mov %cr0, %eax
    or $1, %eax                 /* protected mode */
    mov %eax, %cr0
    ljmpl $0x08, $pm32
    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x1000, %edi           /* page tables at 0x1000..0x3fff, identity-map 2 MiB */
    xor %eax, %eax
    mov $0xc00, %ecx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x0083, 0x3000
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0x1000, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax        /* paging -> long mode */
    mov %eax, %cr0
    ljmp $0x18, $lm64
    .code64
lm64:
    mov $50000000, %ecx         /* ~100M instructions: ms under KVM, ~0.3 s under TCG */
1:  dec %ecx
    jnz 1b
    mov $0x03, %al
    out %al, $0xf4              /* isa-debug-exit: QEMU exits with (3 << 1) | 1 = 7 */
2:  hlt
    jmp 2b
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08 code32 */
    .quad 0x00cf92000000ffff    /* 0x10 data */
    .quad 0x00af9a000000ffff    /* 0x18 code64 */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
