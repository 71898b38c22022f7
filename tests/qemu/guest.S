# A multiboot guest for QEMU (tests/qemu.rs, `migaccel-bench vs-qemu`): 32-bit entry,
# identity-mapped long mode over the first 16 GiB, then CPL 3 code that
#  1. writes a qword into every page of its RAM past 16 MiB (the prefill, as QEMU's
#     migration-test guests fill their range): [16 MiB, RAM_END) and, for guests whose RAM
#     continues above the PCI hole (QEMU's pc machine puts RAM beyond 3 GiB at 4 GiB),
#     [4 GiB, HIGH_END);
#  2. stores PREFILLED at 0x100800;
#  3. increments the first byte of every page of [16 MiB, HOT_END) and [4 GiB, HOT_HIGH_END)
#     forever (the migration-test pattern; empty ranges: no writes), counting the pages
#     written in the qword at 0x100808 (in steps of 16);
#  4. every HEARTBEAT TSC ticks writes one byte to COM1 (0x3f8): a heartbeat whose gap
#     across a migration is the blackout the guest sees (0: no heartbeat).
# Ring 0 is emulated on this host's KVM (PVM), so the kernel part only builds page tables and
# a GDT and drops to CPL 3 (IOPL 3, for the serial port) with interrupts off.
# Built with: as --64 [--defsym NAME=value …] -o guest.o guest.S &&
# ld -m elf_x86_64 -Ttext=0x100000 --oformat binary (the multiboot header's address fields
# make QEMU load the flat image at 1 MiB). Defaults: no prefill, hot range [16 MiB, 80 MiB),
# no heartbeat.
.intel_syntax noprefix
.set PML4, 0x200000
.set PDPT, 0x201000
.set PD,   0x202000
.set GIB_MAPPED, 16
.set PREFILLED, 0x600DF111
.set HIGH_BASE, 0x100000000
.ifndef RAM_END
.set RAM_END, 0x1000000
.endif
.ifndef HOT_END
.set HOT_END, 0x5000000
.endif
.ifndef HIGH_END
.set HIGH_END, HIGH_BASE
.endif
.ifndef HOT_HIGH_END
.set HOT_HIGH_END, HIGH_BASE
.endif
.ifndef HEARTBEAT
.set HEARTBEAT, 0
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
    mov ecx, (2 + GIB_MAPPED) * 1024
    rep stosd
    mov dword ptr [PML4], PDPT + 0x7
    # one page directory per GiB
    mov edi, PDPT
    mov eax, PD + 0x7
    mov ecx, GIB_MAPPED
1:  mov [edi], eax
    add eax, 0x1000
    add edi, 8
    loop 1b
    # 2 MiB pages: low dword in eax, high dword in edx
    mov edi, PD
    mov eax, 0x87
    xor edx, edx
    mov ecx, GIB_MAPPED * 512
1:  mov [edi], eax
    mov [edi + 4], edx
    add eax, 0x200000
    adc edx, 0
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
    push 0x3002
    push 0x23
    lea rax, [rip + user]
    push rax
    iretq
user:
    mov rbx, 0x1000000
    mov rcx, RAM_END
    call fill
    mov rbx, HIGH_BASE
    mov rcx, HIGH_END
    call fill
    mov dword ptr [0x100800], PREFILLED
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r15, rax
2:  mov rbx, 0x1000000
    mov rcx, HOT_END
    call walk
    mov rbx, HIGH_BASE
    mov rcx, HOT_HIGH_END
    call walk
    call beat
    jmp 2b

# fill [rbx, rcx): a qword at offset 16 of every page
fill:
    mov rax, 0x5a5a5a5a5a5a5a5a
3:  cmp rbx, rcx
    jae 4f
    mov [rbx + 16], rax
    add rbx, 4096
    jmp 3b
4:  ret

# walk [rbx, rcx) (64 KiB aligned): increment the first byte of every page; every 16 pages
# add them to the write count and check the heartbeat
walk:
    cmp rbx, rcx
    jae 4f
3:  inc byte ptr [rbx]
    add rbx, 4096
    test ebx, 0xffff
    jnz 5f
    add qword ptr [0x100808], 16
    call beat
5:  cmp rbx, rcx
    jb 3b
4:  ret

# one byte to COM1 when HEARTBEAT ticks passed since the last (r15); clobbers rax, rdx, rsi
beat:
    mov rsi, HEARTBEAT
    test rsi, rsi
    jz 9f
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rdx, rax
    sub rdx, r15
    cmp rdx, rsi
    jb 9f
    mov r15, rax
    mov al, 0x2e
    mov dx, 0x3f8
    out dx, al
9:  ret
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
