/*
 * exitloop: the smallest VMM that measures the VM-exit round trip, as the
 * baseline for gokvm-ft's exit benchmark (cmd/exitbench, BENCHMARKS.md).
 *
 * It talks to /dev/kvm directly: one VM, 2 MiB of guest memory, one vCPU,
 * set up exactly as internal/tinyguest does it (64-bit long mode at CPL3,
 * identity-mapped 4 GiB with 2 MiB pages, GDT, TSS with an all-zero I/O
 * permission bitmap, empty IDT, code at 0x10000, RSP 0x80000), then runs the
 * guest code in a tight KVM_RUN loop: every exit must be KVM_EXIT_IO; an OUT
 * to port 0x80 is counted, an OUT to 0x501 ends the run.
 *
 * Usage: exitloop N [HEXCODE]
 *   N        number of port-0x80 exits the guest makes (its loop count)
 *   HEXCODE  the guest's machine code, linked at 0x10000, in hex; cmd/exitbench
 *            passes the bytes it assembled so that both VMMs run identical
 *            code. Without it the built-in bytes below are used, with N
 *            patched into the mov immediate.
 *
 * Output (one line, key=value): exits=<all exits> io80=<port-0x80 exits>
 * ns=<wall ns of the KVM_RUN loop> ns_per_exit=<ns/exits> code=<exit code>
 *
 * Build: cc -O2 -o exitloop exitloop.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Guest physical layout: the same as internal/tinyguest. */
#define PML4_ADDR 0x1000
#define PDPT_ADDR 0x2000
#define PD_ADDR 0x3000 /* four page directories, 0x3000-0x6fff */
#define GDT_ADDR 0x7000
#define TSS_ADDR 0x7100
#define IDT_ADDR 0xa000
#define KERNEL_STACK 0xf000
#define TSS_LIMIT (104 + 8192) /* header, then one I/O permission bit per port */
#define CODE_BASE 0x10000
#define USER_STACK 0x80000
#define DATA_BASE 0x90000
#define MEM_SIZE (2 << 20) /* what the Go side gives the machine */

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x1b
#define USER_CS 0x23
#define TSS_SEL 0x28

#define VMX_TSS_ADDR 0xfffbd000 /* as machine.New: Intel needs it, AMD ignores it */

#define PORT_SINK 0x80
#define PORT_TEST_EXIT 0x501

/*
 * Built-in guest (GNU as, as cmd/exitbench assembles it):
 *   _start: mov $N, %ecx
 *   1:      out %al, $0x80
 *           dec %ecx
 *           jnz 1b
 *           xor %eax, %eax
 *           mov $0x501, %dx
 *           out %eax, %dx
 *           hlt
 */
static const uint8_t builtin_code[] = {
	0xb9, 0x00, 0x00, 0x00, 0x00, /* mov $N, %ecx (N at offset 1) */
	0xe6, 0x80,                   /* out %al, $0x80 */
	0xff, 0xc9,                   /* dec %ecx */
	0x75, 0xfa,                   /* jnz -6 */
	0x31, 0xc0,                   /* xor %eax, %eax */
	0x66, 0xba, 0x01, 0x05,       /* mov $0x501, %dx */
	0xef,                         /* out %eax, %dx */
	0xf4,                         /* hlt */
};

static void die(const char *what)
{
	fprintf(stderr, "exitloop: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void put64(uint8_t *mem, uint64_t gpa, uint64_t v) { memcpy(mem + gpa, &v, 8); }

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s N [HEXCODE]\n", argv[0]);
		return 2;
	}
	char *end;
	unsigned long n = strtoul(argv[1], &end, 0);
	if (*end || n == 0 || n > 0xffffffffu) {
		fprintf(stderr, "exitloop: bad N %s\n", argv[1]);
		return 2;
	}

	uint8_t code[DATA_BASE - CODE_BASE];
	size_t codelen;
	if (argc == 3) {
		size_t l = strlen(argv[2]);
		if (l == 0 || l % 2 || l / 2 > sizeof(code)) {
			fprintf(stderr, "exitloop: bad code length\n");
			return 2;
		}
		codelen = l / 2;
		for (size_t i = 0; i < codelen; i++) {
			int hi = hexval(argv[2][2 * i]), lo = hexval(argv[2][2 * i + 1]);
			if (hi < 0 || lo < 0) {
				fprintf(stderr, "exitloop: bad hex code\n");
				return 2;
			}
			code[i] = (uint8_t)(hi << 4 | lo);
		}
	} else {
		codelen = sizeof(builtin_code);
		memcpy(code, builtin_code, codelen);
		uint32_t n32 = (uint32_t)n;
		memcpy(code + 1, &n32, 4);
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
		fprintf(stderr, "exitloop: unexpected KVM API version\n");
		return 1;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_SET_TSS_ADDR) > 0 &&
	    ioctl(vm, KVM_SET_TSS_ADDR, VMX_TSS_ADDR) < 0)
		die("KVM_SET_TSS_ADDR");

	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = MEM_SIZE,
		.userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (runsz < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	/* Page tables: 4 GiB identity map with 2 MiB pages, user-accessible. */
	const uint64_t pte = 0x7; /* present, writable, user */
	put64(mem, PML4_ADDR, PDPT_ADDR | pte);
	for (uint64_t i = 0; i < 4; i++)
		put64(mem, PDPT_ADDR + 8 * i, (PD_ADDR + 0x1000 * i) | pte);
	for (uint64_t i = 0; i < 4 * 512; i++)
		put64(mem, PD_ADDR + 8 * i, i << 21 | pte | 0x80); /* PS: 2 MiB page */

	/* GDT: null, kernel code, kernel data, user data, user code, TSS. */
	const uint64_t gdt[] = {0, 0x00209a0000000000, 0x0000920000000000,
				0x0000f20000000000, 0x0020fa0000000000};
	for (int i = 0; i < 5; i++)
		put64(mem, GDT_ADDR + 8 * i, gdt[i]);
	uint64_t tssdesc = (uint64_t)TSS_LIMIT | ((uint64_t)TSS_ADDR & 0xffffff) << 16 |
			   (uint64_t)0x89 << 40 | ((uint64_t)TSS_ADDR >> 24 & 0xff) << 56;
	put64(mem, GDT_ADDR + 0x28, tssdesc);
	put64(mem, GDT_ADDR + 0x30, 0); /* upper half of the 16-byte TSS descriptor */
	const uint16_t gdt_limit = 0x38 - 1;

	/* TSS: RSP0, I/O bitmap at offset 104, all zero (every port allowed at
	 * CPL3), then the 0xff terminator. */
	memset(mem + TSS_ADDR, 0, TSS_LIMIT + 1);
	put64(mem, TSS_ADDR + 4, KERNEL_STACK);
	uint16_t iomap = 104;
	memcpy(mem + TSS_ADDR + 102, &iomap, 2);
	mem[TSS_ADDR + TSS_LIMIT] = 0xff;

	/* IDT: empty (the guest takes no interrupts or exceptions). */
	memset(mem + IDT_ADDR, 0, 4096);

	memcpy(mem + CODE_BASE, code, codelen);

	struct kvm_sregs sr;
	if (ioctl(vcpu, KVM_GET_SREGS, &sr) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = USER_CS, .type = 11,
				 .present = 1, .dpl = 3, .s = 1, .l = 1, .g = 1};
	struct kvm_segment ds = {.base = 0, .limit = 0xffffffff, .selector = USER_DS, .type = 3,
				 .present = 1, .dpl = 3, .s = 1, .db = 1, .g = 1};
	sr.cs = cs;
	sr.ds = sr.es = sr.fs = sr.gs = sr.ss = ds;
	sr.tr = (struct kvm_segment){.base = TSS_ADDR, .limit = TSS_LIMIT, .selector = TSS_SEL,
				     .type = 11, .present = 1};
	sr.ldt = (struct kvm_segment){.type = 2, .present = 1, .unusable = 1};
	sr.gdt.base = GDT_ADDR;
	sr.gdt.limit = gdt_limit;
	sr.idt.base = IDT_ADDR;
	sr.idt.limit = 0xfff;
	sr.cr0 = 0x80010033; /* PG, WP, NE, ET, MP, PE */
	sr.cr3 = PML4_ADDR;
	sr.cr4 = 0x620;  /* OSXMMEXCPT, OSFXSR, PAE */
	sr.efer = 0x501; /* LMA, LME, SCE */
	if (ioctl(vcpu, KVM_SET_SREGS, &sr) < 0)
		die("KVM_SET_SREGS");

	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_BASE;
	regs.rsp = USER_STACK;
	regs.rflags = 0x3002; /* IOPL=3 (the lab host forces it to 0), reserved bit 1 */
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	/* The measured loop. */
	uint64_t exits = 0, io80 = 0;
	uint32_t exitcode = 0;
	uint64_t t0 = now_ns();
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		exits++;
		if (run->exit_reason != KVM_EXIT_IO) {
			struct kvm_regs r;
			ioctl(vcpu, KVM_GET_REGS, &r);
			fprintf(stderr, "exitloop: unexpected exit reason %u after %llu exits (rip=%#llx)\n",
				run->exit_reason, (unsigned long long)exits, (unsigned long long)r.rip);
			return 1;
		}
		if (run->io.port == PORT_SINK) {
			io80++;
			continue;
		}
		if (run->io.port == PORT_TEST_EXIT && run->io.direction == KVM_EXIT_IO_OUT) {
			uint8_t *d = (uint8_t *)run + run->io.data_offset;
			memcpy(&exitcode, d, run->io.size < 4 ? run->io.size : 4);
			break;
		}
		fprintf(stderr, "exitloop: unexpected port %#x after %llu exits\n", run->io.port,
			(unsigned long long)exits);
		return 1;
	}
	uint64_t ns = now_ns() - t0;

	printf("exits=%llu io80=%llu ns=%llu ns_per_exit=%.1f code=%u\n", (unsigned long long)exits,
	       (unsigned long long)io80, (unsigned long long)ns, (double)ns / (double)exits, exitcode);
	if (io80 != n) {
		fprintf(stderr, "exitloop: %llu port-0x80 exits, want %lu\n", (unsigned long long)io80, n);
		return 1;
	}
	return 0;
}
