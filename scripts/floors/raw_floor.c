/*
 * raw_floor.c - the "raw KVM floor" for vmcore benchmarks.
 *
 * This program measures the least work a program using bare KVM ioctls has
 * to do to boot a tiny flat-binary guest to its first console line and then
 * to its exit. Each iteration starts from scratch: it opens /dev/kvm, creates
 * a VM with lazily-populated anonymous guest RAM, an in-kernel irqchip and
 * PIT, one vCPU with the host-supported CPUID, copies the guest image to the
 * load address, enters it in 16-bit real mode, and services port I/O exits
 * (a minimal 16550 UART at 0x3f8 and an exit port at 0xf4) until the guest
 * writes to port 0xf4; it then tears everything down. It reports the time to
 * the first '\n' written to the UART, the time to the exit-port write, and
 * the total including teardown, all from CLOCK_MONOTONIC. vmcore's
 * benchmarks run this in the same session and print vmcore's timings as
 * ratios against it, so the ratio shows what vmcore adds on top of the
 * kernel's own cost rather than numbers that depend on the host.
 *
 * Build: gcc -O2 -Wall -Wextra -o raw_floor raw_floor.c
 * Usage: raw_floor GUEST.bin [--iterations N] [--load-address 0x10000]
 *                            [--memory-mib 64] [--timeout-sec 10] [--json]
 *                            [--single-step]
 *
 * --single-step arms KVM_GUESTDBG_SINGLESTEP before the first run and counts
 * the debug exits (one per instruction): the floor for vmcore's precise mode.
 * The time from the first line to the exit is reported as line_to_exit_us, for
 * guests that print a line and then do the work being measured.
 *
 * Note: with the in-kernel irqchip, a guest HLT is handled inside the kernel
 * and never reaches userspace as KVM_EXIT_HLT; a guest that halts with
 * interrupts off would sleep forever. A SIGALRM every 250 ms makes a blocked
 * KVM_RUN return EINTR, so the run loop can notice an iteration that overruns
 * --timeout-sec and fail instead of hanging; its cost inside the timed work is
 * at most one extra EINTR round trip per 250 ms, which is negligible.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define UART_THR 0x3f8
#define UART_LSR 0x3fd
#define EXIT_PORT 0xf4
#define LSR_IDLE 0x60 /* THR empty + transmitter idle */
#define LINE_MAX_BYTES 4096

struct iter_result {
	double first_line_us;
	double exit_us;
	double total_us;
	uint32_t exit_value;
	uint64_t debug_exits;
	double line_to_exit_us;
};

struct options {
	const char *guest_path;
	long iterations;
	uint64_t load_address;
	uint64_t memory_mib;
	uint64_t timeout_sec;
	int json;
	int single_step;
};

/* Guest console bytes of the current iteration, up to the first newline. */
static char line_buf[LINE_MAX_BYTES];
static size_t line_len;
static int line_done;

static void die_ioctl(const char *name)
{
	perror(name);
	exit(2);
}

static void die_sys(const char *what)
{
	perror(what);
	exit(2);
}

static double now_us(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		die_sys("clock_gettime");
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s GUEST.bin [--iterations N] [--load-address ADDR]\n"
		"       %*s [--memory-mib MIB] [--timeout-sec S] [--json] [--single-step]\n",
		prog, (int)strlen(prog), "");
	exit(2);
}

static uint64_t parse_u64(const char *s, const char *opt, const char *prog)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno != 0 || end == s || *end != '\0' || s[0] == '-') {
		fprintf(stderr, "%s: bad value for %s: '%s'\n", prog, opt, s);
		usage(prog);
	}
	return (uint64_t)v;
}

static void parse_args(int argc, char **argv, struct options *o)
{
	int i;

	o->guest_path = NULL;
	o->iterations = 50;
	o->load_address = 0x10000;
	o->memory_mib = 64;
	o->timeout_sec = 10;
	o->json = 0;
	o->single_step = 0;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (strcmp(a, "--json") == 0) {
			o->json = 1;
		} else if (strcmp(a, "--single-step") == 0) {
			o->single_step = 1;
		} else if (strcmp(a, "--iterations") == 0 ||
			   strcmp(a, "--load-address") == 0 ||
			   strcmp(a, "--memory-mib") == 0 ||
			   strcmp(a, "--timeout-sec") == 0) {
			uint64_t v;

			if (i + 1 >= argc)
				usage(argv[0]);
			v = parse_u64(argv[++i], a, argv[0]);
			if (strcmp(a, "--iterations") == 0) {
				if (v == 0 || v > 10000000)
					usage(argv[0]);
				o->iterations = (long)v;
			} else if (strcmp(a, "--load-address") == 0) {
				o->load_address = v;
			} else if (strcmp(a, "--timeout-sec") == 0) {
				if (v == 0 || v > 86400)
					usage(argv[0]);
				o->timeout_sec = v;
			} else {
				o->memory_mib = v;
			}
		} else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
			usage(argv[0]);
		} else if (a[0] == '-') {
			fprintf(stderr, "%s: unknown option '%s'\n", argv[0], a);
			usage(argv[0]);
		} else if (o->guest_path == NULL) {
			o->guest_path = a;
		} else {
			usage(argv[0]);
		}
	}
	if (o->guest_path == NULL)
		usage(argv[0]);
	if (o->memory_mib == 0 || o->memory_mib > (1u << 20)) {
		fprintf(stderr, "%s: --memory-mib out of range\n", argv[0]);
		exit(2);
	}
	/* Real mode: base = selector << 4, so it must be 16-byte aligned
	 * and reachable with a 16-bit selector. */
	if (o->load_address % 16 != 0 || o->load_address > 0xffff0) {
		fprintf(stderr,
			"%s: --load-address must be 16-byte aligned and <= 0xffff0\n",
			argv[0]);
		exit(2);
	}
}

static unsigned char *read_guest(const char *path, size_t *size)
{
	struct stat st;
	unsigned char *buf;
	size_t got = 0;
	int fd;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die_sys(path);
	if (fstat(fd, &st) != 0)
		die_sys("fstat");
	if (st.st_size <= 0) {
		fprintf(stderr, "%s: empty guest image\n", path);
		exit(2);
	}
	buf = malloc((size_t)st.st_size);
	if (buf == NULL)
		die_sys("malloc");
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die_sys("read");
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	*size = got;
	return buf;
}

/* Query the host's supported CPUID once; retried with a bigger buffer
 * while the kernel answers E2BIG. */
static struct kvm_cpuid2 *get_supported_cpuid(int kvm_fd)
{
	unsigned int nent = 64;

	for (;;) {
		struct kvm_cpuid2 *c;

		c = calloc(1, sizeof(*c) + nent * sizeof(c->entries[0]));
		if (c == NULL)
			die_sys("calloc");
		c->nent = nent;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0)
			return c;
		if (errno != E2BIG || nent >= 4096)
			die_ioctl("KVM_GET_SUPPORTED_CPUID");
		free(c);
		nent *= 2;
	}
}

static int count_open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (d == NULL)
		die_sys("opendir /proc/self/fd");
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the directory stream's own fd */
}

static const char *exit_reason_name(uint32_t r)
{
	switch (r) {
	case KVM_EXIT_UNKNOWN: return "KVM_EXIT_UNKNOWN";
	case KVM_EXIT_EXCEPTION: return "KVM_EXIT_EXCEPTION";
	case KVM_EXIT_IO: return "KVM_EXIT_IO";
	case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
	case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
	case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN";
	case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
	case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
	default: return "unexpected exit";
	}
}

static void guest_failed(int vcpu_fd, const struct kvm_run *run)
{
	struct kvm_regs regs;

	fprintf(stderr, "raw_floor: guest stopped: %s (exit_reason %u)",
		exit_reason_name(run->exit_reason), run->exit_reason);
	if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
		fprintf(stderr, ", hardware reason 0x%llx",
			(unsigned long long)run->fail_entry.hardware_entry_failure_reason);
	if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		fprintf(stderr, ", suberror %u", run->internal.suberror);
	if (run->exit_reason == KVM_EXIT_MMIO)
		fprintf(stderr, ", gpa 0x%llx",
			(unsigned long long)run->mmio.phys_addr);
	if (ioctl(vcpu_fd, KVM_GET_REGS, &regs) == 0)
		fprintf(stderr, ", rip 0x%llx",
			(unsigned long long)regs.rip);
	fprintf(stderr, "\n");
	exit(1);
}

static void set_real_mode_segment(struct kvm_segment *s, uint64_t base)
{
	s->base = base;
	s->selector = (uint16_t)(base >> 4);
	s->limit = 0xffff;
}

static void run_one(const struct options *o, const unsigned char *image,
		    size_t image_size, int mmap_size,
		    const struct kvm_cpuid2 *cpuid, struct iter_result *res)
{
	size_t mem_size = (size_t)o->memory_mib << 20;
	struct kvm_userspace_memory_region region;
	struct kvm_pit_config pit;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	int kvm_fd, vm_fd, vcpu_fd;
	int have_exit = 0;
	void *mem;
	double t0, t_first = -1, t_exit = -1;

	line_len = 0;
	line_done = 0;

	t0 = now_us();

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die_sys("open /dev/kvm");
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0UL);
	if (vm_fd < 0)
		die_ioctl("KVM_CREATE_VM");

	mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die_sys("mmap guest memory");
	memset(&region, 0, sizeof(region));
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = mem_size;
	region.userspace_addr = (uint64_t)(uintptr_t)mem;
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die_ioctl("KVM_SET_USER_MEMORY_REGION");

	if (ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0UL) < 0)
		die_ioctl("KVM_CREATE_IRQCHIP");
	memset(&pit, 0, sizeof(pit));
	pit.flags = 0;
	if (ioctl(vm_fd, KVM_CREATE_PIT2, &pit) < 0)
		die_ioctl("KVM_CREATE_PIT2");

	vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0UL);
	if (vcpu_fd < 0)
		die_ioctl("KVM_CREATE_VCPU");
	run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		   vcpu_fd, 0);
	if (run == MAP_FAILED)
		die_sys("mmap kvm_run");
	if (ioctl(vcpu_fd, KVM_SET_CPUID2, cpuid) < 0)
		die_ioctl("KVM_SET_CPUID2");

	/* Load the image and enter it in real mode at load:0000. */
	memcpy((unsigned char *)mem + o->load_address, image, image_size);

	if (ioctl(vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
		die_ioctl("KVM_GET_SREGS");
	set_real_mode_segment(&sregs.cs, o->load_address);
	set_real_mode_segment(&sregs.ds, o->load_address);
	set_real_mode_segment(&sregs.es, o->load_address);
	set_real_mode_segment(&sregs.ss, o->load_address);
	if (ioctl(vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
		die_ioctl("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = 0;
	regs.rsp = 0;
	regs.rflags = 2;
	if (ioctl(vcpu_fd, KVM_SET_REGS, &regs) < 0)
		die_ioctl("KVM_SET_REGS");
	if (o->single_step) {
		struct kvm_guest_debug debug;

		memset(&debug, 0, sizeof(debug));
		debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
		if (ioctl(vcpu_fd, KVM_SET_GUEST_DEBUG, &debug) < 0)
			die_ioctl("KVM_SET_GUEST_DEBUG");
	}

	while (!have_exit) {
		unsigned char *data;
		uint32_t i, n;

		if (ioctl(vcpu_fd, KVM_RUN, 0UL) < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				if (now_us() - t0 > (double)o->timeout_sec * 1e6) {
					fprintf(stderr,
						"raw_floor: guest did not write port 0x%x within %llu s (halted or looping?)\n",
						EXIT_PORT, (unsigned long long)o->timeout_sec);
					exit(1);
				}
				continue;
			}
			die_ioctl("KVM_RUN");
		}
		/* --single-step: one KVM_EXIT_DEBUG per instruction, nothing to do but go on. */
		if (run->exit_reason == KVM_EXIT_DEBUG && o->single_step) {
			res->debug_exits++;
			continue;
		}
		if (run->exit_reason != KVM_EXIT_IO)
			guest_failed(vcpu_fd, run);

		data = (unsigned char *)run + run->io.data_offset;
		n = (uint32_t)run->io.size * run->io.count;
		if (run->io.direction == KVM_EXIT_IO_IN) {
			memset(data, run->io.port == UART_LSR ? LSR_IDLE : 0xff, n);
			continue;
		}
		if (run->io.port == UART_THR) {
			for (i = 0; i < run->io.count; i++) {
				char ch = (char)data[i * run->io.size];

				if (line_done)
					continue;
				if (ch == '\n') {
					t_first = now_us();
					line_done = 1;
				} else if (line_len < sizeof(line_buf) - 1) {
					line_buf[line_len++] = ch;
				}
			}
		} else if (run->io.port == EXIT_PORT) {
			t_exit = now_us();
			res->exit_value = 0;
			memcpy(&res->exit_value, data,
			       run->io.size <= 4 ? run->io.size : 4);
			have_exit = 1;
		}
	}

	/* Teardown: everything this iteration created. */
	if (munmap(run, (size_t)mmap_size) != 0)
		die_sys("munmap kvm_run");
	if (close(vcpu_fd) != 0)
		die_sys("close vcpu");
	if (close(vm_fd) != 0)
		die_sys("close vm");
	if (munmap(mem, mem_size) != 0)
		die_sys("munmap guest memory");
	if (close(kvm_fd) != 0)
		die_sys("close /dev/kvm");

	res->total_us = now_us() - t0;
	res->exit_us = t_exit - t0;
	if (!line_done) {
		fprintf(stderr,
			"raw_floor: guest exited without printing a full line\n");
		exit(1);
	}
	res->first_line_us = t_first - t0;
	res->line_to_exit_us = t_exit - t_first;
	line_buf[line_len] = '\0';
}

static void on_watchdog_tick(int sig)
{
	(void)sig; /* only here to make a blocked KVM_RUN return EINTR */
}

static void start_watchdog(void)
{
	struct sigaction sa;
	struct itimerval it;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_watchdog_tick;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0; /* no SA_RESTART: we want EINTR */
	if (sigaction(SIGALRM, &sa, NULL) != 0)
		die_sys("sigaction");
	memset(&it, 0, sizeof(it));
	it.it_interval.tv_usec = 250000;
	it.it_value.tv_usec = 250000;
	if (setitimer(ITIMER_REAL, &it, NULL) != 0)
		die_sys("setitimer");
}

static void stop_watchdog(void)
{
	struct itimerval it;

	memset(&it, 0, sizeof(it));
	if (setitimer(ITIMER_REAL, &it, NULL) != 0)
		die_sys("setitimer");
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

struct stats {
	double min, median, mean, max;
};

static struct stats summarize(const struct iter_result *r, long n,
			      size_t field_offset)
{
	double *v = malloc((size_t)n * sizeof(*v));
	struct stats s;
	double sum = 0;
	long i;

	if (v == NULL)
		die_sys("malloc");
	for (i = 0; i < n; i++) {
		memcpy(&v[i], (const char *)&r[i] + field_offset, sizeof(double));
		sum += v[i];
	}
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	s.min = v[0];
	s.max = v[n - 1];
	s.median = (n % 2) ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
	s.mean = sum / (double)n;
	free(v);
	return s;
}

static void json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c < 0x20 || c >= 0x7f)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

int main(int argc, char **argv)
{
	struct options o;
	struct iter_result *res;
	struct kvm_cpuid2 *cpuid;
	struct stats first, ex, total, run;
	unsigned char *image;
	char first_line[LINE_MAX_BYTES];
	size_t image_size;
	double total_sec = 0;
	int kvm_fd, mmap_size, api, fds_before, fds_after;
	long i;

	parse_args(argc, argv, &o);
	image = read_guest(o.guest_path, &image_size);
	if (o.load_address + image_size > (o.memory_mib << 20)) {
		fprintf(stderr, "raw_floor: image (%zu bytes at 0x%llx) does not fit in %llu MiB\n",
			image_size, (unsigned long long)o.load_address,
			(unsigned long long)o.memory_mib);
		return 2;
	}
	if (image_size > 0x10000)
		fprintf(stderr, "raw_floor: warning: image is larger than one 64 KiB real-mode segment\n");

	/* One-time queries, outside the timed loop. */
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die_sys("open /dev/kvm");
	api = ioctl(kvm_fd, KVM_GET_API_VERSION, 0UL);
	if (api < 0)
		die_ioctl("KVM_GET_API_VERSION");
	if (api != KVM_API_VERSION) {
		fprintf(stderr, "raw_floor: KVM API version %d, expected %d\n",
			api, KVM_API_VERSION);
		return 2;
	}
	mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0UL);
	if (mmap_size < 0)
		die_ioctl("KVM_GET_VCPU_MMAP_SIZE");
	if ((size_t)mmap_size < sizeof(struct kvm_run)) {
		fprintf(stderr, "raw_floor: vcpu mmap size %d too small\n", mmap_size);
		return 2;
	}
	cpuid = get_supported_cpuid(kvm_fd);
	close(kvm_fd);

	res = calloc((size_t)o.iterations, sizeof(*res));
	if (res == NULL)
		die_sys("calloc");

	fds_before = count_open_fds();
	first_line[0] = '\0';
	start_watchdog();
	for (i = 0; i < o.iterations; i++) {
		run_one(&o, image, image_size, mmap_size, cpuid, &res[i]);
		if (i == 0)
			memcpy(first_line, line_buf, line_len + 1);
		total_sec += res[i].total_us / 1e6;
	}
	stop_watchdog();
	fds_after = count_open_fds();
	if (fds_after != fds_before) {
		fprintf(stderr, "raw_floor: fd leak: %d open before, %d after\n",
			fds_before, fds_after);
		return 2;
	}

	first = summarize(res, o.iterations, offsetof(struct iter_result, first_line_us));
	ex = summarize(res, o.iterations, offsetof(struct iter_result, exit_us));
	total = summarize(res, o.iterations, offsetof(struct iter_result, total_us));
	run = summarize(res, o.iterations, offsetof(struct iter_result, line_to_exit_us));

	if (o.json) {
		fprintf(stderr, "guest first line: %s\n", first_line);
		printf("{\"iterations\": %ld, ", o.iterations);
		printf("\"first_line_us\": {\"min\": %.1f, \"median\": %.1f, \"mean\": %.1f, \"max\": %.1f}, ",
		       first.min, first.median, first.mean, first.max);
		printf("\"exit_us\": {\"min\": %.1f, \"median\": %.1f, \"mean\": %.1f, \"max\": %.1f}, ",
		       ex.min, ex.median, ex.mean, ex.max);
		printf("\"total_us\": {\"min\": %.1f, \"median\": %.1f, \"mean\": %.1f, \"max\": %.1f}, ",
		       total.min, total.median, total.mean, total.max);
		printf("\"line_to_exit_us\": {\"min\": %.1f, \"median\": %.1f, \"mean\": %.1f, \"max\": %.1f}, ",
		       run.min, run.median, run.mean, run.max);
		printf("\"debug_exits\": %llu, ", (unsigned long long)res[o.iterations - 1].debug_exits);
		printf("\"vms_per_second\": %.1f, ", (double)o.iterations / total_sec);
		printf("\"guest_exit_value\": %u, ", res[o.iterations - 1].exit_value);
		printf("\"first_line\": ");
		json_string(stdout, first_line);
		printf("}\n");
	} else {
		printf("guest first line: %s\n", first_line);
		printf("guest exit value: %u\n", res[o.iterations - 1].exit_value);
		printf("iterations: %ld, memory: %llu MiB, load address: 0x%llx\n\n",
		       o.iterations, (unsigned long long)o.memory_mib,
		       (unsigned long long)o.load_address);
		printf("%-16s %10s %10s %10s %10s\n", "metric (us)", "min", "median", "mean", "max");
		printf("%-16s %10.1f %10.1f %10.1f %10.1f\n", "first_line",
		       first.min, first.median, first.mean, first.max);
		printf("%-16s %10.1f %10.1f %10.1f %10.1f\n", "exit",
		       ex.min, ex.median, ex.mean, ex.max);
		printf("%-16s %10.1f %10.1f %10.1f %10.1f\n", "total+teardown",
		       total.min, total.median, total.mean, total.max);
		printf("\nVMs per second: %.1f\n", (double)o.iterations / total_sec);
	}

	free(res);
	free(cpuid);
	free(image);
	return 0;
}
