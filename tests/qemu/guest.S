# A multiboot guest for QEMU (tests/qemu.rs, `migaccel-bench vs-qemu`): 32-bit entry,
# identity-mapped long mode over the first 4 GiB, then CPL 3 code that first writes a qword
# into every page of [16 MiB, RAM_END) (the prefill, as QEMU's migration-test guests fill
# their range), stores PREFILLED at 0x100800, then increments the first byte of every page
# of [16 MiB, HOT_END) forever (the migration-test pattern; HOT_END = 16 MiB: no writes).
# Ring 0 is emulated on this host's KVM (PVM), so the kernel part only builds page tables and
# a GDT and drops to CPL 3 with interrupts off.
# Built with: as --64 [--defsym RAM_END=… --defsym HOT_END=…] -o guest.o guest.S &&
# ld -m elf_x86_64 -Ttext=0x100000 --oformat binary (the multiboot header's address fields
# make QEMU load the flat image at 1 MiB). Defaults: no prefill, hot range [16 MiB, 80 MiB).
.intel_syntax noprefix
.set PML4, 0x200000
.set PDPT, 0x201000
.set PD,   0x202000
.set PREFILLED, 0x600DF111
.ifndef RAM_END
.set RAM_END, 0x1000000
.endif
.ifndef HOT_END
.set HOT_END, 0x5000000
.endif
.section .text
.code32
.globl _start
_start:
mb_header:
    .long 0x1BADB002
    .long 0x00010000
    .long -(0x1BADB002 + 0x00010000)
    .long mb_header
    .long mb_header
    .long load_end
    .long load_end
    .long entry32
entry32:
    cli
    mov edi, PML4
    xor eax, eax
    mov ecx, 6 * 1024
    rep stosd
    mov dword ptr [PML4], PDPT + 0x7
    mov dword ptr [PDPT], PD + 0x7
    mov dword ptr [PDPT + 8], PD + 0x1000 + 0x7
    mov dword ptr [PDPT + 16], PD + 0x2000 + 0x7
    mov dword ptr [PDPT + 24], PD + 0x3000 + 0x7
    mov edi, PD
    mov eax, 0x87
    mov ecx, 4 * 512
1:  mov [edi], eax
    add eax, 0x200000
    add edi, 8
    loop 1b
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    lgdt [gdt_ptr]
    ljmp 0x08, offset entry64
.code64
entry64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, 0x300000
    push 0x1b
    push 0x400000
    push 0x2
    push 0x23
    lea rax, [rip + user]
    push rax
    iretq
user:
    mov rbx, 0x1000000
    mov rcx, RAM_END
    mov rax, 0x5a5a5a5a5a5a5a5a
3:  cmp rbx, rcx
    jae 4f
    mov [rbx + 16], rax
    add rbx, 4096
    jmp 3b
4:  mov dword ptr [0x100800], PREFILLED
    mov rcx, HOT_END
    mov rbx, 0x1000000
    cmp rbx, rcx
    jae 6f
2:  inc byte ptr [rbx]
    add rbx, 4096
    cmp rbx, rcx
    jb 2b
    mov rbx, 0x1000000
    jmp 2b
6:  jmp 6b
.align 8
gdt:
    .quad 0
    .quad 0x00209A0000000000
    .quad 0x0000920000000000
    .quad 0x0000F20000000000
    .quad 0x0020FA0000000000
gdt_ptr:
    .word 5 * 8 - 1
    .long gdt
load_end:
