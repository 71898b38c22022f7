// SPDX-License-Identifier: GPL-2.0
/*
 * migaccel BPF programs: dirty pages and guest page-state changes, seen on KVM's
 * tracepoints. Raw tracepoints, so that tests can run them with BPF_PROG_TEST_RUN.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define MAX_SLOTS 512
/* 2^18 words x 64 pages = 16 Mi pages = 64 GiB of guest-physical space. */
#define MAX_WORDS (1 << 18)
#define KVM_HC_MAP_GPA_RANGE 12
#define SVM_VMGEXIT_PSC 0x80000010ULL
/* GHCB save-area offsets (SEV-ES GHCB spec). */
#define GHCB_SW_EXIT_CODE 0x390
#define GHCB_SW_EXIT_INFO_1 0x398
#define GHCB_SW_EXIT_INFO_2 0x3a0
/* MAP_GPA_RANGE: more pages than this in one call is treated as bogus. */
#define MAX_RANGE_PAGES (1ULL << 24)

/* Which process's VM to watch: its tgid, or (use_tids) only the threads in `tids`. */
volatile const __u32 target_tgid = 0;
volatile const __u32 use_tids = 0;

struct slot {
	__u64 first_gfn;
	__u64 pages;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct slot);
} slots SEC(".maps");

/* Thread-id filter as a bitmap: 2^22 ids (PID_MAX_LIMIT on 64-bit) in 2^16 words. An array
 * lookup is inlined by the verifier; a hash lookup is a helper call plus hashing, on every
 * dirtied page. */
#define TID_WORDS (1 << 16)
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TID_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} tid_bits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_WORDS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(map_flags, BPF_F_MMAPABLE);
} dirty_bitmap SEC(".maps");

enum {
	ST_PUSHES,      /* dirty-ring pushes seen for the target */
	ST_NEW_BITS,    /* unused (kept for layout) */
	ST_LOST,        /* pushes that could not be recorded (slot unknown, out of range) */
	ST_PS_EVENTS,   /* page-state events written */
	ST_PS_DROPPED,  /* page-state events lost (ring buffer full) */
	ST_GHCB_UNREADABLE,
	ST_MAX,
};

/* Per-CPU: vCPUs on different CPUs never contend on a counter's cache line. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} page_state_events SEC(".maps");

#define PS_MAP_GPA_RANGE 1
#define PS_SNP_PSC 2
/* Event flags: why userspace must not apply an event as is. */
#define PSF_UNALIGNED 1
#define PSF_ZERO_PAGES 2
#define PSF_HUGE 4
#define PSF_OVERFLOW 8

struct ps_event {
	__u32 kind;
	__u32 flags;
	__u64 gpa;
	__u64 npages;
	__u64 attrs;
	__u32 tgid;
	__u32 vcpu;
};

static __always_inline int ours(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (use_tids) {
		__u32 tid = (__u32)id;
		__u32 w = tid / 64;
		__u64 *bits = bpf_map_lookup_elem(&tid_bits, &w);
		return bits && ((*bits >> (tid % 64)) & 1);
	}
	return !target_tgid || (id >> 32) == target_tgid;
}

static __always_inline void bump(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &i);
	if (v)
		*v += 1; /* this CPU's slot; programs run with migration disabled */
}

/* TP_PROTO(struct kvm_dirty_ring *ring, u32 slot, u64 offset) */
SEC("raw_tp/kvm_dirty_ring_push")
int dirty_ring_push(struct bpf_raw_tracepoint_args *ctx)
{
	if (!ours())
		return 0;
	__u32 slot = (__u32)ctx->args[1];
	__u64 offset = ctx->args[2];
	bump(ST_PUSHES);
	__u32 id = slot & 0xffff;
	if ((slot >> 16) != 0 || id >= MAX_SLOTS) {
		bump(ST_LOST);
		return 0;
	}
	struct slot *s = bpf_map_lookup_elem(&slots, &id);
	if (!s || offset >= s->pages) {
		bump(ST_LOST);
		return 0;
	}
	__u64 gfn = s->first_gfn + offset;
	if (gfn / 64 >= MAX_WORDS) {
		bump(ST_LOST);
		return 0;
	}
	__u32 word = gfn / 64;
	__u64 *w = bpf_map_lookup_elem(&dirty_bitmap, &word);
	if (!w) {
		bump(ST_LOST);
		return 0;
	}
	/* Result unused: a plain atomic OR (one `lock or`), not a fetching cmpxchg loop. */
	__sync_fetch_and_or(w, 1ULL << (gfn % 64));
	return 0;
}

/* Pushes per memslot of address space 0 and 1 (`migaccel watch`: a foreign VM, whose
 * memslot layout this process cannot learn, so no page bitmap). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} slot_pushes SEC(".maps");

SEC("raw_tp/kvm_dirty_ring_push")
int dirty_count(struct bpf_raw_tracepoint_args *ctx)
{
	if (!ours())
		return 0;
	__u32 slot = (__u32)ctx->args[1];
	__u32 as = slot >> 16, id = slot & 0xffff;
	bump(ST_PUSHES);
	if (as > 1 || id >= MAX_SLOTS) {
		bump(ST_LOST);
		return 0;
	}
	__u32 key = as * MAX_SLOTS + id;
	__u64 *v = bpf_map_lookup_elem(&slot_pushes, &key);
	if (v)
		*v += 1; /* this CPU's slot */
	return 0;
}

/* The same tracepoint with an empty program: the floor of what any probe costs. */
SEC("raw_tp/kvm_dirty_ring_push")
int dirty_noop(struct bpf_raw_tracepoint_args *ctx)
{
	return 0;
}

/* TP_PROTO(unsigned long nr, a0, a1, a2, a3): MAP_GPA_RANGE(gpa, npages, attrs) */
SEC("raw_tp/kvm_hypercall")
int map_gpa_range(struct bpf_raw_tracepoint_args *ctx)
{
	if (ctx->args[0] != KVM_HC_MAP_GPA_RANGE || !ours())
		return 0;
	__u64 gpa = ctx->args[1], npages = ctx->args[2], attrs = ctx->args[3];
	struct ps_event *e = bpf_ringbuf_reserve(&page_state_events, sizeof(*e), 0);
	if (!e) {
		bump(ST_PS_DROPPED);
		return 0;
	}
	__u32 flags = 0;
	if (gpa & 0xfff)
		flags |= PSF_UNALIGNED;
	if (npages == 0)
		flags |= PSF_ZERO_PAGES;
	if (npages > MAX_RANGE_PAGES)
		flags |= PSF_HUGE;
	else if (gpa + npages * 4096 < gpa)
		flags |= PSF_OVERFLOW;
	e->kind = PS_MAP_GPA_RANGE;
	e->flags = flags;
	e->gpa = gpa;
	e->npages = npages;
	e->attrs = attrs;
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->vcpu = 0;
	bpf_ringbuf_submit(e, 0);
	bump(ST_PS_EVENTS);
	return 0;
}

/* TP_PROTO(unsigned int vcpu_id, struct ghcb *ghcb): SNP page-state change requests. */
SEC("raw_tp/kvm_vmgexit_enter")
int vmgexit_psc(struct bpf_raw_tracepoint_args *ctx)
{
	if (!ours())
		return 0;
	const char *ghcb = (const char *)ctx->args[1];
	__u64 code = 0, info1 = 0, info2 = 0;
	if (bpf_probe_read_kernel(&code, sizeof(code), ghcb + GHCB_SW_EXIT_CODE)) {
		bump(ST_GHCB_UNREADABLE);
		return 0;
	}
	if (code != SVM_VMGEXIT_PSC)
		return 0;
	bpf_probe_read_kernel(&info1, sizeof(info1), ghcb + GHCB_SW_EXIT_INFO_1);
	bpf_probe_read_kernel(&info2, sizeof(info2), ghcb + GHCB_SW_EXIT_INFO_2);
	struct ps_event *e = bpf_ringbuf_reserve(&page_state_events, sizeof(*e), 0);
	if (!e) {
		bump(ST_PS_DROPPED);
		return 0;
	}
	e->kind = PS_SNP_PSC;
	e->flags = 0;
	e->gpa = info1;
	e->npages = 0;
	e->attrs = info2;
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->vcpu = (__u32)ctx->args[0];
	bpf_ringbuf_submit(e, 0);
	bump(ST_PS_EVENTS);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
