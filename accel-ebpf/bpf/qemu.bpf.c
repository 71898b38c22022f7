// SPDX-License-Identifier: GPL-2.0
/*
 * migaccel BPF programs for a VM that another process (QEMU) owns: which guest pages it
 * dirties, when each report becomes safe to act on, and which pages QEMU writes itself.
 *
 * - KVM's dirty ring reports a page once (kvm_dirty_ring_push) and leaves it writable until
 *   the owner resets the ring entry (kvm_dirty_ring_reset). Each push records the page's
 *   guest frame in a bitmap and its ring entry in push_seq; each reset records how far the
 *   ring was re-protected. A page may be copied once its entry is below its ring's reset
 *   index (later writes push it again).
 * - A push names a memslot and an offset in it, not a guest address, and QEMU's memslot
 *   numbers cannot be read from outside. The vCPU thread's kvm_mmu_spte_requested, which
 *   KVM emits for the same fault just before the push, carries the guest frame: it
 *   translates the push and teaches each memslot's base for pushes without one.
 * - QEMU's own writes to guest RAM (device models, its debugger, DMA) reach no KVM log:
 *   uprobes on the exported functions that write guest memory record them, on return (the
 *   bytes are in RAM by then), into a ring buffer.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define MAX_SLOTS 512
/* Guest frames the bitmap covers: 2^18 words x 64 = 64 GiB of guest-physical space. */
#define MAX_WORDS (1 << 18)
#define MAX_RINGS 1024

volatile const __u32 target_tgid = 0;
/* &address_space_io in QEMU (port I/O, never guest RAM), 0 if unknown. */
volatile const __u64 io_as = 0;
/* QEMU's mapping of guest RAM: host-pointer writes inside it are RAM writes. */
volatile const __u64 ram_host = 0;
volatile const __u64 ram_len = 0;
/* Guest frames past the backend's RAM: pushes there (video memory, firmware) are QEMU's. */
volatile const __u64 gfn_end = 0;
/* A fault's frame belongs to a push on the same thread only this soon after it: KVM emits
 * both inside one fault, under its MMU lock. */
#define FAULT_FRESH_NS 50000ULL
/* Rings (vCPUs) whose resets are committed at the ioctl's exit. */
#define COMMIT_RINGS 64
/* A committed reset index carries this bit: the ring was seen reset since attach. */
#define RESET_SEEN (1ULL << 32)

enum {
	QS_PUSHES,
	QS_LOST,        /* pushes that could not be translated or recorded */
	QS_LEARNED,     /* memslot bases learned (or re-learned) */
	QS_RESETS,
	QS_HOST_WRITES, /* QEMU writes recorded */
	QS_HOST_DROPPED,/* QEMU writes lost (ring buffer full) */
	QS_OUTSIDE,     /* pushes past the backend's RAM (QEMU migrates those blocks) */
	QS_SMM,         /* pushes in the SMM address space: userspace resends all RAM */
	QS_MISMATCH,    /* a fault's frame disagreed with its slot's base: both marked */
	QS_LOG_ON,      /* QEMU switched global dirty logging on (memory_global_dirty_log_start) */
	QS_UNPLACED,    /* pushes on a memslot whose base is not known yet: userspace resends all RAM */
	QS_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, QS_MAX);
	__type(key, __u32);
	__type(value, __u64);
} qstats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_WORDS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(map_flags, BPF_F_MMAPABLE);
} qdirty SEC(".maps");

/* Per guest frame: (ring << 32) | ring entry of its latest push. Sized at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(map_flags, BPF_F_MMAPABLE);
} push_seq SEC(".maps");

/* Per ring (vCPU): the reset index as of the last KVM_RESET_DIRTY_RINGS that returned
 * (RESET_SEEN | index): only then are its pages write-protected and the TLBs flushed. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_RINGS);
	__type(key, __u32);
	__type(value, __u64);
} ring_reset SEC(".maps");

/* Per ring: the reset index the running reset ioctl reached (committed at its exit). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_RINGS);
	__type(key, __u32);
	__type(value, __u64);
} staged_reset SEC(".maps");

/* Threads inside a reset ioctl. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} resetting SEC(".maps");

/* Per memslot: a base the last mismatching fault suggested (+1), adopted when a second
 * fault agrees. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} slot_candidate SEC(".maps");

/* Per memslot (address space x id): first guest frame + 1, 0 while unknown. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} slot_base SEC(".maps");

struct fault {
	__u32 tid;
	__u32 pad;
	__u64 gfn;
	__u64 ns;
};

/* Per CPU: the guest frame of the fault being handled (KVM handles it without sleeping). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fault);
} last_fault SEC(".maps");

static __always_inline int ours(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == target_tgid;
}

static __always_inline void bump(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&qstats, &i);
	if (v)
		*v += 1;
}

/* Tracepoint records (see /sys/kernel/tracing/events/<system>/<event>/format). */
struct spte_requested {
	__u64 common;
	__u64 gfn;
	__u64 pfn;
	__u8 level;
};

struct ring_push {
	__u64 common;
	__s32 index;
	__u32 dirty_index;
	__u32 reset_index;
	__u32 slot;
	__u64 offset;
};

struct ring_reset_rec {
	__u64 common;
	__s32 index;
	__u32 dirty_index;
	__u32 reset_index;
};

SEC("tracepoint/kvmmmu/kvm_mmu_spte_requested")
int q_spte(struct spte_requested *ctx)
{
	if (!ours())
		return 0;
	__u32 zero = 0;
	struct fault *f = bpf_map_lookup_elem(&last_fault, &zero);
	if (f) {
		f->tid = (__u32)bpf_get_current_pid_tgid();
		f->gfn = ctx->gfn;
		f->ns = bpf_ktime_get_ns();
	}
	return 0;
}

/* Set the dirty bit of `gfn` and record the ring entry of its push; 0 if recorded. */
static __always_inline int mark(__u64 gfn, struct ring_push *ctx)
{
	if (gfn >= gfn_end) {
		bump(QS_OUTSIDE);
		return 0;
	}
	__u32 word = gfn / 64;
	__u64 *w = gfn / 64 < MAX_WORDS ? bpf_map_lookup_elem(&qdirty, &word) : 0;
	__u32 g = gfn;
	__u64 *seq = bpf_map_lookup_elem(&push_seq, &g);
	if (!w || !seq)
		return -1;
	/* The entry this push filled: the tracepoint fires after dirty_index advanced. */
	*seq = ((__u64)(__u32)ctx->index << 32) | (__u32)(ctx->dirty_index - 1);
	__sync_fetch_and_or(w, 1ULL << (gfn % 64));
	return 0;
}

SEC("tracepoint/kvm/kvm_dirty_ring_push")
int q_push(struct ring_push *ctx)
{
	if (!ours())
		return 0;
	bump(QS_PUSHES);
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 as = ctx->slot >> 16, id = ctx->slot & 0xffff;
	__u64 offset = ctx->offset;
	if (as == 1) {
		/* SMRAM is not in the system address space's layout. */
		bump(QS_SMM);
		return 0;
	}
	if (as > 1 || id >= MAX_SLOTS) {
		bump(QS_LOST);
		return 0;
	}
	__u32 key = id;
	__u64 *base = bpf_map_lookup_elem(&slot_base, &key);
	__u64 *cand = bpf_map_lookup_elem(&slot_candidate, &key);
	if (!base || !cand) {
		bump(QS_LOST);
		return 0;
	}
	__u32 zero = 0;
	struct fault *f = bpf_map_lookup_elem(&last_fault, &zero);
	__u64 fault_gfn = 0;
	int fresh = 0;
	if (f && f->tid == tid && f->gfn >= offset && bpf_ktime_get_ns() - f->ns < FAULT_FRESH_NS) {
		fresh = 1;
		fault_gfn = f->gfn;
		f->tid = 0;
	}
	if (!*base) {
		if (!fresh) {
			/* No fault names this push's frame (KVM wrote guest memory itself): the
			 * page is unknown, so all of RAM goes again. */
			bump(QS_UNPLACED);
			return 0;
		}
		*base = fault_gfn - offset + 1;
		bump(QS_LEARNED);
	}
	__u64 gfn = *base - 1 + offset;
	if (mark(gfn, ctx)) {
		bump(QS_LOST);
		return 0;
	}
	if (fresh && fault_gfn != gfn) {
		/* The slot moved, or the fault was not this push's: mark both frames, and adopt
		 * the new base once a second fault agrees. */
		bump(QS_MISMATCH);
		if (mark(fault_gfn, ctx))
			bump(QS_LOST);
		__u64 nb = fault_gfn - offset + 1;
		if (*cand == nb) {
			*base = nb;
			bump(QS_LEARNED);
		}
		*cand = nb;
	}
	return 0;
}

SEC("tracepoint/kvm/kvm_dirty_ring_reset")
int q_reset(struct ring_reset_rec *ctx)
{
	if (!ours())
		return 0;
	bump(QS_RESETS);
	__u32 ring = ctx->index;
	__u64 *r = ring < MAX_RINGS ? bpf_map_lookup_elem(&staged_reset, &ring) : 0;
	if (r)
		*r = RESET_SEEN | ctx->reset_index;
	__u32 tid = (__u32)bpf_get_current_pid_tgid(), one = 1;
	bpf_map_update_elem(&resetting, &tid, &one, BPF_ANY);
	return 0;
}

/* The reset ioctl returned: KVM has re-protected the pages and flushed the TLBs. */
SEC("tracepoint/syscalls/sys_exit_ioctl")
int q_ioctl_exit(void *ctx)
{
	if (!ours())
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	if (!bpf_map_lookup_elem(&resetting, &tid))
		return 0;
	bpf_map_delete_elem(&resetting, &tid);
	for (__u32 i = 0; i < COMMIT_RINGS; i++) {
		__u32 k = i;
		__u64 *st = bpf_map_lookup_elem(&staged_reset, &k);
		__u64 *co = bpf_map_lookup_elem(&ring_reset, &k);
		if (st && co && *st)
			*co = *st;
	}
	return 0;
}

/* ---- QEMU's own writes ------------------------------------------------------------------ */

/* x86-64 struct pt_regs as uprobe programs see it. */
struct regs {
	__u64 r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags,
		sp, ss;
};

#define HW_GPA 1
#define HW_HOST 2
/* A write whose guest-physical address cannot be known here (a debugger's write at a
 * guest-virtual address): userspace resends all of RAM. */
#define HW_ANYWHERE 3

struct host_write {
	__u32 kind;
	__u32 func;
	__u64 addr;
	__u64 len;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
} host_writes SEC(".maps");

/* Calls in flight, by thread and function (the cookie's low byte): recorded on entry,
 * reported on return. A plain hash: an entry is never evicted, a full map is counted. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct host_write);
} inflight SEC(".maps");

static __always_inline __u64 call_key(__u64 cookie)
{
	return ((__u64)(__u32)bpf_get_current_pid_tgid() << 8) | (cookie & 0xff);
}

static __always_inline int enter(struct regs *ctx, __u32 kind, __u64 addr, __u64 len)
{
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u64 key = call_key(cookie);
	struct host_write w = { .kind = kind, .func = cookie & 0xff, .addr = addr, .len = len };
	if (bpf_map_update_elem(&inflight, &key, &w, BPF_ANY))
		bump(QS_HOST_DROPPED);
	return 0;
}

/* (as, addr, attrs, buf, len): address_space_write, address_space_write_rom. */
SEC("uprobe")
int q_gpa_write(struct regs *ctx)
{
	if (io_as && ctx->di == io_as)
		return 0;
	return enter(ctx, HW_GPA, ctx->si, ctx->r8);
}

/* (as, addr, attrs, buf, len, is_write): address_space_rw. */
SEC("uprobe")
int q_gpa_rw(struct regs *ctx)
{
	if ((io_as && ctx->di == io_as) || !(ctx->r9 & 0xff))
		return 0;
	return enter(ctx, HW_GPA, ctx->si, ctx->r8);
}

/* (as, addr, c, len, attrs): address_space_set. */
SEC("uprobe")
int q_gpa_set(struct regs *ctx)
{
	if (io_as && ctx->di == io_as)
		return 0;
	return enter(ctx, HW_GPA, ctx->si, ctx->cx);
}

/* (as, addr, val, attrs, result): address_space_st{b,w,l,q}*; the width is in the cookie. */
SEC("uprobe")
int q_gpa_store(struct regs *ctx)
{
	if (io_as && ctx->di == io_as)
		return 0;
	return enter(ctx, HW_GPA, ctx->si, bpf_get_attach_cookie(ctx) >> 8);
}

/* (cpu, vaddr, buf, len, is_write): cpu_memory_rw_debug (gdb stub, monitor). Its own
 * call of address_space_write_rom is inlined, so it is probed itself. */
SEC("uprobe")
int q_debug_write(struct regs *ctx)
{
	if (!(ctx->r8 & 0xff))
		return 0;
	return enter(ctx, HW_ANYWHERE, ctx->si, ctx->cx);
}

static __always_inline int enter_host(struct regs *ctx, __u64 ptr, __u64 len)
{
	if (ptr < ram_host || ptr - ram_host >= ram_len)
		return 0;
	return enter(ctx, HW_HOST, ptr - ram_host, len);
}

/* (as, buffer, len, is_write, access_len): address_space_unmap (DMA). */
SEC("uprobe")
int q_unmap(struct regs *ctx)
{
	if (!(ctx->cx & 0xff))
		return 0;
	return enter_host(ctx, ctx->si, ctx->r8);
}

/* (cache, addr, access_len): address_space_cache_invalidate, after writes through a
 * cached mapping (virtio rings); the cache's first field is its host pointer. */
SEC("uprobe")
int q_cache_invalidate(struct regs *ctx)
{
	__u64 ptr = 0;
	if (bpf_probe_read_user(&ptr, sizeof(ptr), (void *)ctx->di) || !ptr)
		return 0;
	return enter_host(ctx, ptr + ctx->si, ctx->dx);
}

/* QEMU switched global dirty logging on: its memslots carry KVM_MEM_LOG_DIRTY_PAGES now. */
SEC("uretprobe")
int q_log_on(struct regs *ctx)
{
	bump(QS_LOG_ON);
	return 0;
}

SEC("uretprobe")
int q_return(struct regs *ctx)
{
	__u64 key = call_key(bpf_get_attach_cookie(ctx));
	struct host_write *w = bpf_map_lookup_elem(&inflight, &key);
	if (!w)
		return 0;
	struct host_write *e = bpf_ringbuf_reserve(&host_writes, sizeof(*e), 0);
	if (!e) {
		bump(QS_HOST_DROPPED);
	} else {
		*e = *w;
		bpf_ringbuf_submit(e, 0);
		bump(QS_HOST_WRITES);
	}
	bpf_map_delete_elem(&inflight, &key);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
