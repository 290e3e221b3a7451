/*
 * hatch-agent: the guest side of hatchvm's host<->guest channel, protocol version 1.
 * The host side is src/hatchvm/agent/ (protocol.py); docs/agent-protocol.md describes both.
 *
 * Started by busybox init (::respawn:). Serves the virtio-serial port named
 * org.hatchvm.agent.0 (found under /sys/class/virtio-ports, no udev needed):
 *   HELLO   its protocol version and capabilities (also sent unasked, id 0, when it starts);
 *   PING    echoes its DATA field;
 *   SYNC    sets the wall clock to the host's time and reseeds the kernel's RNG with the
 *           host's random bytes (after a snapshot restore), answering with the new time;
 *   EXEC    runs a command (argv, env, cwd, stdin, timeout) and streams its output and exit,
 *           or starts it in the background; PROC_* list, read, signal and forget those;
 *   FILE_*  reads, writes, stats, lists and deletes files, streamed in chunks;
 *   IDENTITY gives a fork's child its own hostname, machine id, MAC, address and default
 *           route (and the gateway's MAC, agent 6), and removes the SSH host keys and
 *           restarts dropbear (new keys at the next connection): all in this process, no
 *           command started.
 *
 * One thread, one poll loop. Nothing waits on the host: the port is non-blocking, answers go
 * to a bounded queue, and a request whose answer is long (output, a file) is a session that
 * sends a frame only while hatchd has granted it credit (CREDIT frames) and the queue has
 * room, so memory stays bounded whatever the host or the commands do. Every frame the agent
 * writes is at most 32 KiB, one write() to the port: an agent killed at any moment never
 * leaves half a frame behind for its successor.
 *
 * The host is hatchd, but every byte is still checked: frames are bounded (16-byte header,
 * payload <= 64 KiB), a bad header is skipped up to the next magic, a bad field is answered
 * with an ERROR frame. When hatchd goes away, read() returns 0 until it connects again (the
 * port's SIGIO ends the wait); what its requests started is cancelled then.
 *
 * Built by the image builder: gcc -static -Os. `hatch-agent --stdio` serves stdin/stdout
 * instead of the port, for the host's tests.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_NAME "hatch-agent 6"
#define PORT_NAME "org.hatchvm.agent.0"
#define PORTS_DIR "/sys/class/virtio-ports"
#define VERSION 1
#define HEADER 16
#define MAX_PAYLOAD 65536      /* the largest frame hatchd may send */
#define OUT_FRAME 32768        /* the largest frame the agent sends: one port write */
#define CHUNK (OUT_FRAME - 64) /* data bytes in one frame, leaving room for its other fields */
#define OUTQ (8 * OUT_FRAME)   /* answers waiting for the port */
#define MAX_ENTROPY 512
#define MIN_ENTROPY 16
#define MAX_SESSIONS 32         /* long answers in progress: execs, transfers, listings */
#define MAX_PROCS 16            /* background processes remembered (running or finished) */
#define KEEP (256 * 1024)       /* output kept per stream of a background process */
#define STDIN_MAX (16 << 20)    /* stdin of one command */
#define LINGER_MS 1000          /* how long a command's pipes may stay open after it exits */
#define MAX_CREDIT 4096         /* frames hatchd may have granted one session */
#define CMD_MAX 1024            /* of a background process's command line, as listed */

enum {
	T_HELLO = 0x01,
	T_PING = 0x02,
	T_SYNC = 0x03,
	T_INPUT = 0x04,
	T_CREDIT = 0x05,
	T_CANCEL = 0x06,
	T_EXEC = 0x10,
	T_PROC_LIST = 0x11,
	T_PROC_GET = 0x12,
	T_PROC_KILL = 0x13,
	T_FILE_READ = 0x20,
	T_FILE_WRITE = 0x21,
	T_FILE_STAT = 0x22,
	T_FILE_LIST = 0x23,
	T_FILE_DELETE = 0x24,
	T_IDENTITY = 0x30,
	T_ERROR = 0x7f,
	T_REPLY = 0x80,
};
enum { F_END = 0x0001 };
enum {
	TAG_VERSION = 1,
	TAG_AGENT = 2,
	TAG_CAP = 3,
	TAG_DATA = 4,
	TAG_TIME_NS = 5,
	TAG_ENTROPY = 6,
	TAG_CODE = 7,
	TAG_MESSAGE = 8,
	TAG_ARGV = 9,
	TAG_ENV = 10,
	TAG_CWD = 11,
	TAG_TIMEOUT_MS = 12,
	TAG_LIMIT = 13,
	TAG_BACKGROUND = 14,
	TAG_STDIN = 15,
	TAG_WINDOW = 16,
	TAG_CREDIT = 17,
	TAG_STREAM = 18,
	TAG_EXIT_CODE = 19,
	TAG_SIGNAL = 20,
	TAG_TIMED_OUT = 21,
	TAG_TRUNCATED = 22,
	TAG_PID = 23,
	TAG_PROC = 24,
	TAG_CMD = 25,
	TAG_RUNNING = 26,
	TAG_STARTED_NS = 27,
	TAG_ENDED_NS = 28,
	TAG_OUT_BYTES = 29,
	TAG_ERR_BYTES = 30,
	TAG_PATH = 31,
	TAG_MODE = 32,
	TAG_PARENTS = 33,
	TAG_SIZE = 34,
	TAG_MTIME_NS = 35,
	TAG_KIND = 36,
	TAG_ENTRY = 37,
	TAG_NAME = 38,
	TAG_RECURSIVE = 39,
	TAG_ERRNO = 40,
	TAG_FORGET = 41,
	TAG_MACHINE_ID = 42,
	TAG_ADDR = 43,
	TAG_MAC = 44,
	TAG_GATEWAY = 45,
	TAG_GATEWAY_MAC = 46,
};
enum {
	E_BAD_FRAME = 1,
	E_UNSUPPORTED = 2,
	E_BAD_FIELD = 3,
	E_FAILED = 4,
	E_VERSION = 5,
	E_BUSY = 6,
	E_NO_SUCH = 7,
};

static unsigned char in[HEADER + MAX_PAYLOAD];
static size_t have;
static unsigned char frame[OUT_FRAME]; /* the frame being built */
static size_t flen;
static unsigned char outq[OUTQ];
static size_t oq_head, oq_tail, oq_left; /* oq_left: bytes of the head frame not yet written */
static unsigned char scratch[CHUNK];     /* output read past a command's limit, dropped */
static int port_in = -1, port_out = -1, stdio_mode, connected, sigfd = -1;
extern char **environ;

/* ---- small helpers -------------------------------------------------------------------- */

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint16_t get16(const unsigned char *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static void put16(unsigned char *p, uint16_t v)
{
	p[0] = v >> 8;
	p[1] = v;
}

static int64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int64_t wall_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_REALTIME, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int64_t ts_ns(const struct timespec *t)
{
	return (int64_t)t->tv_sec * 1000000000 + t->tv_nsec;
}

/* ---- writing frames -------------------------------------------------------------------- */

static void begin(int type, uint32_t id, int end)
{
	memset(frame, 0, HEADER);
	frame[0] = 'H';
	frame[1] = 'V';
	frame[2] = VERSION;
	frame[3] = type;
	put32(frame + 4, id);
	put16(frame + 8, end ? F_END : 0);
	flen = HEADER;
}

static int add(int tag, const void *value, size_t len)
{
	if (flen + 6 + len > sizeof(frame))
		return -1;
	put16(frame + flen, tag);
	put32(frame + flen + 2, len);
	memcpy(frame + flen + 6, value, len);
	flen += 6 + len;
	return 0;
}

static void add_int(int tag, int64_t v)
{
	unsigned char b[8];
	for (int i = 0; i < 8; i++)
		b[i] = (uint64_t)v >> (56 - 8 * i);
	add(tag, b, 8);
}

static void add_text(int tag, const char *s)
{
	add(tag, s, strlen(s));
}

/* A field holding fields (a process, a directory entry): open it, add, close it. */
static size_t open_nested(int tag)
{
	size_t at = flen;
	put16(frame + flen, tag);
	flen += 6;
	return at;
}

static void close_nested(size_t at)
{
	put32(frame + at + 2, flen - at - 6);
}

static size_t room(void)
{
	return OUTQ - (oq_tail - oq_head);
}

/* Every caller made sure there is room for a whole frame (see the loop's rules). */
static void queue_frame(void)
{
	put32(frame + 12, flen - HEADER);
	if (room() < flen) {
		fprintf(stderr, "hatch-agent: answer queue full, frame dropped (a bug)\n");
		return;
	}
	if (OUTQ - oq_tail < flen) {
		memmove(outq, outq + oq_head, oq_tail - oq_head);
		oq_tail -= oq_head;
		oq_head = 0;
	}
	memcpy(outq + oq_tail, frame, flen);
	oq_tail += flen;
}

/* Write what the port takes now, a whole frame per write(). -1: the other side is gone. */
static int flush_out(void)
{
	while (oq_head < oq_tail) {
		if (oq_left == 0)
			oq_left = HEADER + get32(outq + oq_head + 12);
		ssize_t n = write(port_out, outq + oq_head, oq_left);
		if (n > 0) {
			oq_head += n;
			oq_left -= n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n == 0 || errno == EAGAIN) {
			return 0;
		} else {
			return -1;
		}
	}
	oq_head = oq_tail = 0;
	return 0;
}

/* An ERROR frame: the code, the guest's errno (0: none), the request field at fault (NULL:
 * none) and what happened. */
static void vfail(uint32_t id, int code, int err, const char *field, const char *fmt, va_list ap)
{
	char message[512];
	vsnprintf(message, sizeof(message), fmt, ap);
	begin(T_ERROR, id, 1);
	add_int(TAG_CODE, code);
	if (err)
		add_int(TAG_ERRNO, err);
	if (field != NULL)
		add_text(TAG_NAME, field);
	add_text(TAG_MESSAGE, message);
	queue_frame();
}

static void fail(uint32_t id, int code, int err, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfail(id, code, err, NULL, fmt, ap);
	va_end(ap);
}

static void fail_in(uint32_t id, const char *field, int code, int err, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfail(id, code, err, field, fmt, ap);
	va_end(ap);
}

/* ---- reading fields -------------------------------------------------------------------- */

struct field {
	const unsigned char *value;
	uint32_t len;
};

static int well_formed(const unsigned char *p, uint32_t len)
{
	uint32_t at = 0;
	while (at < len) {
		if (len - at < 6 || get32(p + at + 2) > len - at - 6)
			return 0;
		at += 6 + get32(p + at + 2);
	}
	return 1;
}

/* The field at *at, moving past it; 0 at the end. The payload is well formed. */
static int next_field(const unsigned char *p, uint32_t len, uint32_t *at, int *tag, struct field *f)
{
	if (*at >= len)
		return 0;
	*tag = get16(p + *at);
	f->len = get32(p + *at + 2);
	f->value = p + *at + 6;
	*at += 6 + f->len;
	return 1;
}

/* The first field with this tag; 0 if absent. The payload is well formed. */
static int find(const unsigned char *p, uint32_t len, int tag, struct field *f)
{
	uint32_t at = 0;
	int t;
	while (next_field(p, len, &at, &t, f))
		if (t == tag)
			return 1;
	return 0;
}

static int64_t as_int(const struct field *f)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | f->value[i];
	return (int64_t)v;
}

/* An integer field into *v: 1 found, 0 absent (*v keeps its default), -1 not 8 bytes. */
static int get_int(const unsigned char *p, uint32_t len, int tag, int64_t *v)
{
	struct field f;
	if (!find(p, len, tag, &f))
		return 0;
	if (f.len != 8)
		return -1;
	*v = as_int(&f);
	return 1;
}

/* A text field as a new C string: NULL if absent; *bad when it holds a NUL. */
static char *get_text(const unsigned char *p, uint32_t len, int tag, int *bad)
{
	struct field f;
	if (!find(p, len, tag, &f))
		return NULL;
	if (memchr(f.value, 0, f.len) != NULL) {
		*bad = 1;
		return NULL;
	}
	return strndup((const char *)f.value, f.len);
}

/* ---- background processes -------------------------------------------------------------- */

struct ring { /* the newest KEEP bytes of a stream: [total - min(total, KEEP), total) */
	unsigned char *buf;
	int64_t total;
};

struct proc {
	int used;
	uint64_t seq; /* order of starting; a session reading it checks it is still the same */
	pid_t pid;
	char cmd[CMD_MAX];
	int out[2];
	struct ring ring[2];
	int running, status, timed_out;
	int64_t started_ns, ended_ns, deadline;
};

static struct proc procs[MAX_PROCS];
static uint64_t proc_seq;

static int64_t ring_start(const struct ring *r)
{
	return r->total > KEEP ? r->total - KEEP : 0;
}

static void ring_add(struct ring *r, const unsigned char *data, size_t n)
{
	if (r->buf == NULL && (r->buf = malloc(KEEP)) == NULL) {
		r->total += n; /* nowhere to keep it: counted, not kept */
		return;
	}
	while (n > 0) {
		size_t at = r->total % KEEP, part = KEEP - at < n ? KEEP - at : n;
		memcpy(r->buf + at, data, part);
		r->total += part;
		data += part;
		n -= part;
	}
}

static void forget_proc(struct proc *p)
{
	for (int k = 0; k < 2; k++) {
		if (p->out[k] >= 0)
			close(p->out[k]);
		free(p->ring[k].buf);
	}
	memset(p, 0, sizeof(*p));
}

static struct proc *find_proc(int64_t pid)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used && procs[i].pid == pid)
			return &procs[i];
	return NULL;
}

static void add_exit(int status, int timed_out)
{
	if (WIFEXITED(status))
		add_int(TAG_EXIT_CODE, WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		add_int(TAG_SIGNAL, WTERMSIG(status));
	add_int(TAG_TIMED_OUT, timed_out);
}

static void add_proc(const struct proc *p)
{
	size_t at = open_nested(TAG_PROC);
	add_int(TAG_PID, p->pid);
	add_text(TAG_CMD, p->cmd);
	add_int(TAG_RUNNING, p->running);
	add_int(TAG_STARTED_NS, p->started_ns);
	add_int(TAG_OUT_BYTES, p->ring[0].total);
	add_int(TAG_ERR_BYTES, p->ring[1].total);
	if (!p->running) {
		add_exit(p->status, p->timed_out);
		add_int(TAG_ENDED_NS, p->ended_ns);
	}
	close_nested(at);
}

/* ---- sessions: requests answered over time ---------------------------------------------- */

enum { S_FREE, S_EXEC, S_READ, S_WRITE, S_LIST, S_PROC };

struct session {
	int kind;
	uint32_t id;
	int64_t credit; /* frames hatchd will take now */
	int fd;         /* exec: stdin until started; read: the file; write: the temporary file */
	/* exec */
	unsigned char *req;
	uint32_t req_len;
	pid_t pid;
	int out[2];
	int64_t limit, sent[2], stdin_len;
	int truncated, started, reaped, status, timed_out;
	int64_t deadline, linger;
	/* write */
	char *path, *tmp;
	int mode, chown;
	uid_t uid;
	gid_t gid;
	int64_t size;
	/* list */
	DIR *dir;
	/* process output */
	struct proc *proc;
	uint64_t seq;
	int stream;
	int64_t pos, end[2];
};

static struct session sessions[MAX_SESSIONS];

static struct session *find_session(uint32_t id)
{
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (sessions[i].kind != S_FREE && sessions[i].id == id)
			return &sessions[i];
	return NULL;
}

static struct session *new_session(int kind, uint32_t id, const unsigned char *p, uint32_t len)
{
	if (find_session(id) != NULL) {
		fail(id, E_BAD_FIELD, 0, "request id %u is in use", id);
		return NULL;
	}
	int64_t window = 0;
	if (get_int(p, len, TAG_WINDOW, &window) < 0 || window < 1 || window > MAX_CREDIT) {
		fail(id, E_BAD_FIELD, 0, "a streamed answer needs WINDOW (1-%d frames)", MAX_CREDIT);
		return NULL;
	}
	for (int i = 0; i < MAX_SESSIONS; i++) {
		struct session *s = &sessions[i];
		if (s->kind == S_FREE) {
			memset(s, 0, sizeof(*s));
			s->kind = kind;
			s->id = id;
			s->credit = window;
			s->fd = s->out[0] = s->out[1] = -1;
			return s;
		}
	}
	fail(id, E_BUSY, 0, "the agent is busy (%d requests in progress)", MAX_SESSIONS);
	return NULL;
}

/* The session is over (answered, failed or cancelled): nothing of it stays. */
static void end_session(struct session *s)
{
	if (s->kind == S_EXEC && s->started && !s->reaped)
		kill(-s->pid, SIGKILL); /* its process group: nobody waits for its output any more */
	for (int k = 0; k < 2; k++)
		if (s->out[k] >= 0)
			close(s->out[k]);
	if (s->fd >= 0)
		close(s->fd);
	if (s->tmp != NULL)
		unlink(s->tmp);
	if (s->dir != NULL)
		closedir(s->dir);
	free(s->req);
	free(s->path);
	free(s->tmp);
	memset(s, 0, sizeof(*s));
}

/* ---- commands ---------------------------------------------------------------------------- */

static const char *const BASE_ENV[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"USER=root",
	"LOGNAME=root",
	"SHELL=/bin/sh",
};
#define N_BASE_ENV (sizeof(BASE_ENV) / sizeof(BASE_ENV[0]))

struct command {
	char **argv, **envp, *cwd;
	char *strings;
};

static void free_command(struct command *c)
{
	free(c->argv);
	free(c->envp);
	free(c->strings);
	free(c->cwd);
	memset(c, 0, sizeof(*c));
}

static int same_key(const char *a, const char *b)
{
	size_t n = strcspn(a, "=");
	return strncmp(a, b, n) == 0 && b[n] == '=';
}

/* argv (ARGV, repeated, at least one), the environment (the base one, overridden by ENV
 * entries "NAME=value") and the directory (CWD). -1 with why filled in if malformed. */
static int parse_command(const unsigned char *p, uint32_t len, struct command *c, char *why,
			 size_t size)
{
	uint32_t at = 0, total = 0;
	int tag, argc = 0, envc = 0, bad = 0;
	struct field f;
	memset(c, 0, sizeof(*c));
	while (next_field(p, len, &at, &tag, &f)) {
		if (tag != TAG_ARGV && tag != TAG_ENV)
			continue;
		if (memchr(f.value, 0, f.len) != NULL) {
			snprintf(why, size, "%s holds a NUL byte", tag == TAG_ARGV ? "argv" : "env");
			return -1;
		}
		if (tag == TAG_ENV && (f.len == 0 || f.value[0] == '=' || !memchr(f.value, '=', f.len))) {
			snprintf(why, size, "env entries are NAME=value");
			return -1;
		}
		argc += tag == TAG_ARGV;
		envc += tag == TAG_ENV;
		total += f.len + 1;
	}
	if (argc == 0 || (argc == 1 && find(p, len, TAG_ARGV, &f) && f.len == 0)) {
		snprintf(why, size, "no command (ARGV)");
		return -1;
	}
	c->cwd = get_text(p, len, TAG_CWD, &bad);
	if (bad) {
		snprintf(why, size, "cwd holds a NUL byte");
		return -1;
	}
	c->strings = malloc(total + 1);
	c->argv = calloc(argc + 1, sizeof(char *));
	c->envp = calloc(envc + N_BASE_ENV + 1, sizeof(char *));
	if (c->strings == NULL || c->argv == NULL || c->envp == NULL) {
		free_command(c);
		snprintf(why, size, "out of memory");
		return -1;
	}
	char *s = c->strings;
	int ai = 0, ei = 0;
	at = 0;
	while (next_field(p, len, &at, &tag, &f)) {
		if (tag != TAG_ARGV && tag != TAG_ENV)
			continue;
		memcpy(s, f.value, f.len);
		s[f.len] = 0;
		if (tag == TAG_ARGV)
			c->argv[ai++] = s;
		else
			c->envp[ei++] = s;
		s += f.len + 1;
	}
	for (size_t b = 0; b < N_BASE_ENV; b++) {
		int overridden = 0;
		for (int i = 0; i < envc; i++)
			overridden |= same_key(BASE_ENV[b], c->envp[i]);
		if (!overridden)
			c->envp[ei++] = (char *)BASE_ENV[b];
	}
	return 0;
}

/* In the child: its own session and process group (a timeout kills the whole group), the
 * signals init gave us back, stdin/stdout/stderr, the directory, then the program. A failure
 * before exec goes back through x: {step, errno}. */
static void child(struct command *c, int stdin_fd, int out, int err, int x)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (stdin_fd < 0)
		stdin_fd = open("/dev/null", O_RDONLY);
	dup2(stdin_fd, 0);
	dup2(out, 1);
	dup2(err, 2);
	int report[2] = {1, 0};
	if (c->cwd != NULL ? chdir(c->cwd) < 0 : (chdir("/root") < 0 && chdir("/") < 0)) {
		report[1] = errno;
	} else {
		environ = c->envp;
		execvp(c->argv[0], c->argv);
		report[0] = 2;
		report[1] = errno;
	}
	if (write(x, report, sizeof(report)) < 0)
		_exit(126);
	_exit(127);
}

/* Start the command in p. Its pid, with out[] its stdout and stderr (non-blocking), or -1
 * with the error code, errno (0 if none) and why. */
static pid_t spawn(const unsigned char *p, uint32_t len, int stdin_fd, int out[2], char *cmd,
		   int *code, int *err, const char **field, char *why, size_t size)
{
	struct command c;
	*err = 0;
	*code = E_BAD_FIELD;
	*field = NULL;
	if (parse_command(p, len, &c, why, size) < 0)
		return -1;
	if (cmd != NULL) {
		cmd[0] = 0;
		for (int i = 0; c.argv[i] != NULL; i++) {
			size_t used = strlen(cmd);
			snprintf(cmd + used, CMD_MAX - used, "%s%s", i ? " " : "", c.argv[i]);
		}
	}
	*code = E_FAILED;
	int o[2] = {-1, -1}, e[2] = {-1, -1}, x[2] = {-1, -1};
	if (pipe2(o, O_CLOEXEC) < 0 || pipe2(e, O_CLOEXEC) < 0 || pipe2(x, O_CLOEXEC) < 0) {
		*err = errno;
		snprintf(why, size, "pipe: %s", strerror(errno));
		goto fail;
	}
	pid_t pid = fork();
	if (pid == 0)
		child(&c, stdin_fd, o[1], e[1], x[1]);
	if (pid < 0) {
		*err = errno;
		snprintf(why, size, "fork: %s", strerror(errno));
		goto fail;
	}
	close(o[1]);
	close(e[1]);
	close(x[1]);
	o[1] = e[1] = x[1] = -1;
	int report[2];
	ssize_t n;
	do
		n = read(x[0], report, sizeof(report));
	while (n < 0 && errno == EINTR);
	if (n == sizeof(report)) {
		waitpid(pid, NULL, 0);
		*err = report[1];
		*field = report[0] == 1 ? "cwd" : "cmd";
		if (report[0] == 1)
			snprintf(why, size, "%s: %s", c.cwd ? c.cwd : "/root", strerror(report[1]));
		else
			snprintf(why, size, "cannot run %s: %s", c.argv[0], strerror(report[1]));
		goto fail;
	}
	close(x[0]);
	fcntl(o[0], F_SETFL, O_NONBLOCK);
	fcntl(e[0], F_SETFL, O_NONBLOCK);
	out[0] = o[0];
	out[1] = e[0];
	free_command(&c);
	return pid;
fail:
	for (int i = 0; i < 2; i++) {
		if (o[i] >= 0)
			close(o[i]);
		if (e[i] >= 0)
			close(e[i]);
		if (x[i] >= 0)
			close(x[i]);
	}
	free_command(&c);
	return -1;
}

static void exec_start(struct session *s)
{
	char why[512];
	int code, err;
	const char *field;
	if (s->fd >= 0)
		lseek(s->fd, 0, SEEK_SET);
	pid_t pid = spawn(s->req, s->req_len, s->fd, s->out, NULL, &code, &err, &field, why,
			  sizeof(why));
	if (s->fd >= 0) {
		close(s->fd);
		s->fd = -1;
	}
	if (pid < 0) {
		fail_in(s->id, field, code, err, "%s", why);
		end_session(s);
		return;
	}
	int64_t timeout = 0;
	get_int(s->req, s->req_len, TAG_TIMEOUT_MS, &timeout);
	s->pid = pid;
	s->started = 1;
	s->deadline = timeout > 0 ? now_ms() + timeout : 0;
	/* The first frame: the command runs (hatchd tells a restarted agent from this one by it). */
	begin(T_EXEC | T_REPLY, s->id, 0);
	add_int(TAG_PID, pid);
	queue_frame();
	s->credit--;
}

static void exec_background(uint32_t id, const unsigned char *p, uint32_t len)
{
	struct proc *slot = NULL;
	for (int i = 0; i < MAX_PROCS && slot == NULL; i++)
		if (!procs[i].used)
			slot = &procs[i];
	if (slot == NULL) /* forget the oldest finished one */
		for (int i = 0; i < MAX_PROCS; i++)
			if (!procs[i].running && (slot == NULL || procs[i].seq < slot->seq))
				slot = &procs[i];
	if (slot == NULL) {
		fail(id, E_BUSY, 0, "%d background processes are running", MAX_PROCS);
		return;
	}
	char why[512], cmd[CMD_MAX];
	int code, err, out[2];
	const char *field;
	pid_t pid = spawn(p, len, -1, out, cmd, &code, &err, &field, why, sizeof(why));
	if (pid < 0) {
		fail_in(id, field, code, err, "%s", why);
		return;
	}
	if (slot->used)
		forget_proc(slot);
	int64_t timeout = 0;
	get_int(p, len, TAG_TIMEOUT_MS, &timeout);
	slot->used = 1;
	slot->seq = ++proc_seq;
	slot->pid = pid;
	memcpy(slot->cmd, cmd, sizeof(cmd));
	slot->out[0] = out[0];
	slot->out[1] = out[1];
	slot->running = 1;
	slot->started_ns = wall_ns();
	slot->deadline = timeout > 0 ? now_ms() + timeout : 0;
	begin(T_EXEC | T_REPLY, id, 1);
	add_int(TAG_PID, pid);
	add_proc(slot);
	queue_frame();
}

static void exec_request(uint32_t id, const unsigned char *p, uint32_t len)
{
	int64_t background = 0, with_stdin = 0, limit = -1;
	if (get_int(p, len, TAG_BACKGROUND, &background) < 0 ||
	    get_int(p, len, TAG_STDIN, &with_stdin) < 0 || get_int(p, len, TAG_LIMIT, &limit) < 0) {
		fail(id, E_BAD_FIELD, 0, "BACKGROUND, STDIN and LIMIT are integers");
		return;
	}
	if (background) {
		if (with_stdin)
			fail(id, E_BAD_FIELD, 0, "a background process reads no stdin");
		else
			exec_background(id, p, len);
		return;
	}
	struct session *s = new_session(S_EXEC, id, p, len);
	if (s == NULL)
		return;
	s->limit = limit;
	s->req = malloc(len ? len : 1);
	if (s->req == NULL) {
		fail(id, E_FAILED, ENOMEM, "out of memory");
		end_session(s);
		return;
	}
	memcpy(s->req, p, len);
	s->req_len = len;
	if (!with_stdin) {
		exec_start(s);
		return;
	}
	/* stdin arrives in INPUT frames; the command starts once it is all there */
	s->fd = memfd_create("hatch-stdin", MFD_CLOEXEC);
	if (s->fd < 0) {
		fail(id, E_FAILED, errno, "memfd_create: %s", strerror(errno));
		end_session(s);
	}
}

/* Read what one of the command's pipes holds: to hatchd while it has credit and the limit
 * is not reached, past the limit into nothing (the command must never block on us). */
static void exec_read(struct session *s, int k)
{
	int discard = s->limit >= 0 && s->sent[k] >= s->limit;
	ssize_t n;
	if (discard) {
		n = read(s->out[k], scratch, sizeof(scratch));
		if (n > 0)
			s->truncated |= 1 << k;
	} else {
		size_t want = CHUNK;
		if (s->limit >= 0 && (int64_t)want > s->limit - s->sent[k])
			want = s->limit - s->sent[k];
		begin(T_EXEC | T_REPLY, s->id, 0);
		add_int(TAG_STREAM, k + 1);
		put16(frame + flen, TAG_DATA);
		n = read(s->out[k], frame + flen + 6, want);
		if (n > 0) {
			put32(frame + flen + 2, n);
			flen += 6 + n;
			queue_frame();
			s->credit--;
			s->sent[k] += n;
		}
	}
	if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
		close(s->out[k]);
		s->out[k] = -1;
	}
}

static void exec_finish(struct session *s)
{
	begin(T_EXEC | T_REPLY, s->id, 1);
	add_exit(s->status, s->timed_out);
	add_int(TAG_TRUNCATED, s->truncated);
	queue_frame();
	end_session(s);
}

/* ---- processes: list, read, signal, forget ---------------------------------------------- */

static void proc_list(uint32_t id)
{
	begin(T_PROC_LIST | T_REPLY, id, 1);
	uint64_t after = 0;
	for (;;) { /* in the order they were started */
		struct proc *next = NULL;
		for (int i = 0; i < MAX_PROCS; i++)
			if (procs[i].used && procs[i].seq > after &&
			    (next == NULL || procs[i].seq < next->seq))
				next = &procs[i];
		if (next == NULL)
			break;
		add_proc(next);
		after = next->seq;
	}
	queue_frame();
}

static struct proc *proc_named(uint32_t id, const unsigned char *p, uint32_t len)
{
	int64_t pid = 0;
	if (get_int(p, len, TAG_PID, &pid) != 1) {
		fail(id, E_BAD_FIELD, 0, "PID is required");
		return NULL;
	}
	struct proc *proc = find_proc(pid);
	if (proc == NULL)
		fail(id, E_NO_SUCH, 0, "no background process %lld", (long long)pid);
	return proc;
}

static void proc_get(uint32_t id, const unsigned char *p, uint32_t len)
{
	struct proc *proc = proc_named(id, p, len);
	if (proc == NULL)
		return;
	struct session *s = new_session(S_PROC, id, p, len);
	if (s == NULL)
		return;
	s->proc = proc;
	s->seq = proc->seq;
	s->end[0] = proc->ring[0].total;
	s->end[1] = proc->ring[1].total;
	s->pos = ring_start(&proc->ring[0]);
	begin(T_PROC_GET | T_REPLY, id, 0);
	add_proc(proc);
	queue_frame();
	s->credit--;
}

/* The next chunk of the process's kept output, up to where it was when asked. */
static void proc_produce(struct session *s)
{
	struct proc *proc = s->proc;
	if (!proc->used || proc->seq != s->seq) /* forgotten meanwhile */
		s->stream = 2;
	while (s->stream < 2) {
		struct ring *r = &proc->ring[s->stream];
		if (s->pos < ring_start(r)) /* overwritten while we were sending */
			s->pos = ring_start(r);
		if (s->pos < s->end[s->stream] && r->buf != NULL)
			break;
		if (++s->stream < 2)
			s->pos = ring_start(&proc->ring[1]);
	}
	if (s->stream >= 2) {
		begin(T_PROC_GET | T_REPLY, s->id, 1);
		queue_frame();
		end_session(s);
		return;
	}
	struct ring *r = &proc->ring[s->stream];
	size_t at = s->pos % KEEP, n = s->end[s->stream] - s->pos;
	if (n > KEEP - at)
		n = KEEP - at;
	if (n > CHUNK)
		n = CHUNK;
	begin(T_PROC_GET | T_REPLY, s->id, 0);
	add_int(TAG_STREAM, s->stream + 1);
	add(TAG_DATA, r->buf + at, n);
	queue_frame();
	s->credit--;
	s->pos += n;
}

static void proc_kill(uint32_t id, const unsigned char *p, uint32_t len)
{
	int64_t sig = SIGKILL, forget = 0;
	if (get_int(p, len, TAG_SIGNAL, &sig) < 0 || get_int(p, len, TAG_FORGET, &forget) < 0 ||
	    sig < 0 || sig > 64) {
		fail(id, E_BAD_FIELD, 0, "SIGNAL (0-64) and FORGET are integers");
		return;
	}
	struct proc *proc = proc_named(id, p, len);
	if (proc == NULL)
		return;
	if (proc->running && sig != 0) {
		kill(-proc->pid, sig);
		kill(proc->pid, sig); /* in case it left its process group */
	}
	begin(T_PROC_KILL | T_REPLY, id, 1);
	add_proc(proc);
	queue_frame();
	if (forget) {
		if (proc->running) {
			kill(-proc->pid, SIGKILL);
			kill(proc->pid, SIGKILL);
		}
		forget_proc(proc);
	}
}

/* ---- files ------------------------------------------------------------------------------ */

static const char *kind_of(mode_t mode)
{
	return S_ISREG(mode) ? "file" : S_ISDIR(mode) ? "dir" : S_ISLNK(mode) ? "symlink" : "other";
}

static void add_stat(const struct stat *st)
{
	add_text(TAG_KIND, kind_of(st->st_mode));
	add_int(TAG_SIZE, st->st_size);
	add_int(TAG_MODE, st->st_mode & 07777);
	add_int(TAG_MTIME_NS, ts_ns(&st->st_mtim));
}

/* PATH: absolute, no NUL. NULL (and the error sent) otherwise. */
static char *path_of(uint32_t id, const unsigned char *p, uint32_t len)
{
	int bad = 0;
	char *path = get_text(p, len, TAG_PATH, &bad);
	if (path == NULL || path[0] != '/') {
		fail(id, E_BAD_FIELD, 0, "PATH must be an absolute path without NUL bytes");
		free(path);
		return NULL;
	}
	return path;
}

static void file_stat(uint32_t id, const unsigned char *p, uint32_t len)
{
	char *path = path_of(id, p, len);
	struct stat st;
	if (path == NULL)
		return;
	if (stat(path, &st) < 0) {
		fail(id, E_FAILED, errno, "%s: %s", path, strerror(errno));
	} else {
		begin(T_FILE_STAT | T_REPLY, id, 1);
		add_stat(&st);
		queue_frame();
	}
	free(path);
}

static void file_read(uint32_t id, const unsigned char *p, uint32_t len)
{
	char *path = path_of(id, p, len);
	struct stat st;
	if (path == NULL)
		return;
	/* O_NONBLOCK: opening a FIFO must not hang the agent; it is refused below anyway */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		fail(id, E_FAILED, errno, "%s: %s", path, strerror(errno));
	} else if (fstat(fd, &st) < 0) {
		fail(id, E_FAILED, errno, "%s: %s", path, strerror(errno));
		close(fd);
	} else if (S_ISDIR(st.st_mode)) {
		fail(id, E_FAILED, EISDIR, "%s: %s", path, strerror(EISDIR));
		close(fd);
	} else if (!S_ISREG(st.st_mode)) {
		fail(id, E_FAILED, 0, "%s is not a regular file", path);
		close(fd);
	} else {
		struct session *s = new_session(S_READ, id, p, len);
		if (s == NULL) {
			close(fd);
		} else {
			fcntl(fd, F_SETFL, 0);
			s->fd = fd;
			begin(T_FILE_READ | T_REPLY, id, 0);
			add_stat(&st);
			queue_frame();
			s->credit--;
		}
	}
	free(path);
}

static void read_produce(struct session *s)
{
	begin(T_FILE_READ | T_REPLY, s->id, 0);
	put16(frame + flen, TAG_DATA);
	ssize_t n = read(s->fd, frame + flen + 6, CHUNK);
	if (n < 0 && errno == EINTR)
		return;
	if (n < 0) {
		fail(s->id, E_FAILED, errno, "read: %s", strerror(errno));
		end_session(s);
	} else if (n == 0) {
		begin(T_FILE_READ | T_REPLY, s->id, 1);
		queue_frame();
		end_session(s);
	} else {
		put32(frame + flen + 2, n);
		flen += 6 + n;
		queue_frame();
		s->credit--;
	}
}

/* mkdir -p of path's parent directory. */
static int make_parents(char *path)
{
	for (char *slash = strchr(path + 1, '/'); slash != NULL; slash = strchr(slash + 1, '/')) {
		*slash = 0;
		int rc = mkdir(path, 0755);
		*slash = '/';
		if (rc < 0 && errno != EEXIST)
			return -1;
	}
	return 0;
}

/* The file is written beside its destination and renamed over it at the end: it appears
 * whole or not at all. It keeps an existing file's owner and, unless MODE says, its mode. */
static void file_write(uint32_t id, const unsigned char *p, uint32_t len)
{
	int64_t mode = -1, parents = 0;
	if (get_int(p, len, TAG_MODE, &mode) < 0 || get_int(p, len, TAG_PARENTS, &parents) < 0 ||
	    mode < -1 || mode > 07777) {
		fail(id, E_BAD_FIELD, 0, "MODE (0-07777) and PARENTS are integers");
		return;
	}
	char *path = path_of(id, p, len);
	if (path == NULL)
		return;
	struct stat st;
	char *slash = strrchr(path, '/');
	if (slash[1] == 0) {
		fail(id, E_FAILED, EISDIR, "%s: %s", path, strerror(EISDIR));
		free(path);
		return;
	}
	if (parents && make_parents(path) < 0) {
		fail(id, E_FAILED, errno, "%s: %s", path, strerror(errno));
		free(path);
		return;
	}
	int exists = stat(path, &st) == 0;
	if (exists && S_ISDIR(st.st_mode)) {
		fail(id, E_FAILED, EISDIR, "%s: %s", path, strerror(EISDIR));
		free(path);
		return;
	}
	char *tmp = NULL;
	if (asprintf(&tmp, "%.*s/.%s.hatch-XXXXXX", (int)(slash - path), path, slash + 1) < 0) {
		fail(id, E_FAILED, ENOMEM, "out of memory");
		free(path);
		return;
	}
	int fd = mkostemp(tmp, O_CLOEXEC);
	if (fd < 0) {
		int err = errno;
		/* the directory's error, named by the path that was asked for */
		fail(id, E_FAILED, err, "%s: %s", path, strerror(err));
		free(path);
		free(tmp);
		return;
	}
	struct session *s = new_session(S_WRITE, id, p, len);
	if (s == NULL) {
		close(fd);
		unlink(tmp);
		free(path);
		free(tmp);
		return;
	}
	s->fd = fd;
	s->path = path;
	s->tmp = tmp;
	s->mode = mode >= 0 ? (int)mode : exists ? (int)(st.st_mode & 07777) : 0644;
	s->chown = exists;
	s->uid = exists ? st.st_uid : 0;
	s->gid = exists ? st.st_gid : 0;
	begin(T_FILE_WRITE | T_REPLY, id, 0); /* ready: send the bytes */
	queue_frame();
	s->credit--;
}

static void write_finish(struct session *s)
{
	struct stat st;
	if (fchmod(s->fd, s->mode) < 0 || (s->chown && fchown(s->fd, s->uid, s->gid) < 0) ||
	    fstat(s->fd, &st) < 0 || close(s->fd) < 0) {
		s->fd = -1;
		fail(s->id, E_FAILED, errno, "%s: %s", s->path, strerror(errno));
		end_session(s);
		return;
	}
	s->fd = -1;
	if (rename(s->tmp, s->path) < 0) {
		fail(s->id, E_FAILED, errno, "%s: %s", s->path, strerror(errno));
		end_session(s);
		return;
	}
	free(s->tmp);
	s->tmp = NULL;
	begin(T_FILE_WRITE | T_REPLY, s->id, 1);
	add_stat(&st);
	queue_frame();
	end_session(s);
}

/* An INPUT frame: the next bytes of a command's stdin or of a file being written. */
static void input(uint32_t id, int end, const unsigned char *p, uint32_t len)
{
	struct session *s = find_session(id);
	struct field data = {0};
	if (s == NULL || (s->kind != S_WRITE && !(s->kind == S_EXEC && !s->started)))
		return; /* cancelled or failed meanwhile: the rest of its input is dropped */
	find(p, len, TAG_DATA, &data);
	int64_t *count = s->kind == S_WRITE ? &s->size : &s->stdin_len;
	if (s->kind == S_EXEC && *count + data.len > STDIN_MAX) {
		fail(id, E_BAD_FIELD, 0, "stdin over %d bytes", STDIN_MAX);
		end_session(s);
		return;
	}
	for (uint32_t done = 0; done < data.len;) {
		ssize_t n = write(s->fd, data.value + done, data.len - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			int err = n < 0 ? errno : ENOSPC;
			fail(id, E_FAILED, err, "%s: %s", s->kind == S_WRITE ? s->path : "stdin",
			     strerror(err));
			end_session(s);
			return;
		}
		done += n;
	}
	*count += data.len;
	if (end) {
		if (s->kind == S_WRITE)
			write_finish(s);
		else
			exec_start(s);
	}
}

static void file_list(uint32_t id, const unsigned char *p, uint32_t len)
{
	char *path = path_of(id, p, len);
	if (path == NULL)
		return;
	DIR *dir = opendir(path);
	if (dir == NULL) {
		fail(id, E_FAILED, errno, "%s: %s", path, strerror(errno));
		free(path);
		return;
	}
	free(path);
	struct session *s = new_session(S_LIST, id, p, len);
	if (s == NULL) {
		closedir(dir);
		return;
	}
	s->dir = dir;
}

/* One frame of entries (as many as fit); the last frame, with END, may hold some too. */
static void list_produce(struct session *s)
{
	begin(T_FILE_LIST | T_REPLY, s->id, 0);
	struct dirent *e = NULL;
	int err = 0;
	while (flen < OUT_FRAME - 1024) {
		struct stat st;
		errno = 0;
		if ((e = readdir(s->dir)) == NULL) {
			err = errno;
			break;
		}
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (fstatat(dirfd(s->dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue; /* gone meanwhile */
		size_t at = open_nested(TAG_ENTRY);
		add_text(TAG_NAME, e->d_name);
		add_stat(&st);
		close_nested(at);
	}
	if (e == NULL) { /* readdir ended: the directory is done */
		if (err != 0) {
			fail(s->id, E_FAILED, err, "readdir: %s", strerror(err));
		} else {
			put16(frame + 8, F_END);
			queue_frame();
		}
		end_session(s);
		return;
	}
	queue_frame();
	s->credit--;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path) < 0 ? errno : 0;
}

static void file_delete(uint32_t id, const unsigned char *p, uint32_t len)
{
	int64_t recursive = 0;
	if (get_int(p, len, TAG_RECURSIVE, &recursive) < 0) {
		fail(id, E_BAD_FIELD, 0, "RECURSIVE is an integer");
		return;
	}
	char *path = path_of(id, p, len);
	if (path == NULL)
		return;
	struct stat st;
	int err = 0;
	if (lstat(path, &st) < 0)
		err = errno;
	else if (!S_ISDIR(st.st_mode))
		err = unlink(path) < 0 ? errno : 0;
	else if (!recursive)
		err = rmdir(path) < 0 ? errno : 0;
	else /* depth first, never following a symlink out of the tree */
		err = nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS);
	if (err > 0) {
		fail(id, E_FAILED, err, "%s: %s", path, strerror(err));
	} else if (err < 0) {
		fail(id, E_FAILED, errno, "%s: %s", path, strerror(errno));
	} else {
		begin(T_FILE_DELETE | T_REPLY, id, 1);
		queue_frame();
	}
	free(path);
}

/* ---- the simple requests ----------------------------------------------------------------- */

static void hello(uint32_t id)
{
	begin(T_HELLO | T_REPLY, id, 1);
	add_int(TAG_VERSION, VERSION);
	add_text(TAG_AGENT, AGENT_NAME);
	add_text(TAG_CAP, "ping");
	add_text(TAG_CAP, "sync");
	add_text(TAG_CAP, "exec");
	add_text(TAG_CAP, "files");
	add_text(TAG_CAP, "identity");
	queue_frame();
}

static void ping(uint32_t id, const unsigned char *p, uint32_t len)
{
	struct field data = {0};
	find(p, len, TAG_DATA, &data);
	if (data.len > CHUNK) {
		fail(id, E_BAD_FIELD, 0, "ping data over %d bytes", CHUNK);
		return;
	}
	begin(T_PING | T_REPLY, id, 1);
	add(TAG_DATA, data.value, data.len);
	queue_frame();
}

static int reseed(const unsigned char *bytes, uint32_t len, char *why, size_t size)
{
	struct {
		int entropy_count;
		int buf_size;
		unsigned char buf[MAX_ENTROPY];
	} pool;
	pool.entropy_count = (int)len * 8;
	pool.buf_size = (int)len;
	memcpy(pool.buf, bytes, len);
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		snprintf(why, size, "open /dev/urandom: %s", strerror(errno));
		return -1;
	}
	int rc = 0;
	/* Mix the host's bytes in (credited), then make the CRNG take a new key from the pool
	 * now rather than at its next scheduled reseed: from here on this guest's randomness
	 * differs from any other guest restored from the same memory. */
	if (ioctl(fd, RNDADDENTROPY, &pool) < 0) {
		snprintf(why, size, "RNDADDENTROPY: %s", strerror(errno));
		rc = -1;
	} else if (ioctl(fd, RNDRESEEDCRNG) < 0) {
		snprintf(why, size, "RNDRESEEDCRNG: %s", strerror(errno));
		rc = -1;
	}
	explicit_bzero(&pool, sizeof(pool));
	close(fd);
	return rc;
}

static void sync_clock_and_rng(uint32_t id, const unsigned char *p, uint32_t len)
{
	struct field t = {0}, e = {0};
	int has_t = find(p, len, TAG_TIME_NS, &t);
	int has_e = find(p, len, TAG_ENTROPY, &e);
	if (!has_t || t.len != 8 || !has_e || e.len < MIN_ENTROPY || e.len > MAX_ENTROPY) {
		fail(id, E_BAD_FIELD, 0, "sync needs TIME_NS (8 bytes) and ENTROPY (16-512 bytes)");
		return;
	}
	char clock_why[96] = "", rng_why[96] = "";
	int64_t ns = as_int(&t);
	struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
	if (ns < 0 || clock_settime(CLOCK_REALTIME, &ts) < 0)
		snprintf(clock_why, sizeof(clock_why), "clock_settime: %s",
			 ns < 0 ? "negative time" : strerror(errno));
	reseed(e.value, e.len, rng_why, sizeof(rng_why));
	if (clock_why[0] || rng_why[0]) {
		fail(id, E_FAILED, 0, "%s%s%s", clock_why, clock_why[0] && rng_why[0] ? "; " : "",
		     rng_why);
		return;
	}
	begin(T_SYNC | T_REPLY, id, 1);
	add_int(TAG_TIME_NS, wall_ns());
	queue_frame();
}

/* ---- identity (a fork's child) ---------------------------------------------------------- */

static int put_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	size_t n = strlen(text);
	int rc = write(fd, text, n) == (ssize_t)n ? 0 : -1;
	return close(fd) < 0 ? -1 : rc;
}

static int parse_mac(const char *text, unsigned char mac[6])
{
	unsigned v[6];
	char end;
	if (sscanf(text, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
		   &end) != 6)
		return -1;
	for (int i = 0; i < 6; i++)
		mac[i] = (unsigned char)v[i];
	return 0;
}

static void set_in(struct sockaddr *sa, struct in_addr a)
{
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr = a};
	memcpy(sa, &sin, sizeof(sin));
}

/* The gateway's neighbour entry on eth0, resolved (ATF_COM: the kernel keeps it as a
 * stale entry it will confirm later). A new MAC empties eth0's neighbour table: the child's
 * first answer would wait for an ARP round trip, and an ARP request sent before its TAP is
 * up is lost, leaving the entry to wait a second for its next probe (and every packet queued
 * behind it). Set here, the first answer needs no ARP, and a pending resolution ends at once
 * with its packets sent. */
static int set_gateway_neighbour(int s, struct in_addr gw, const unsigned char mac[6])
{
	struct arpreq req;
	memset(&req, 0, sizeof(req));
	set_in(&req.arp_pa, gw);
	req.arp_ha.sa_family = ARPHRD_ETHER;
	memcpy(req.arp_ha.sa_data, mac, 6);
	req.arp_flags = ATF_COM;
	snprintf(req.arp_dev, sizeof(req.arp_dev), "eth0");
	return ioctl(s, SIOCSARP, &req);
}

/* eth0 gets mac, addr/prefix, a default route via gw and, when gw_mac is given, gw's
 * neighbour entry (best effort); why says what failed. */
static int set_address(const char *mac_text, const char *addr_text, const char *gw_text,
		       const char *gw_mac_text, char *why, size_t size)
{
	unsigned char mac[6], gw_mac[6];
	char ip[64];
	int prefix = -1;
	struct in_addr addr, gw, mask;
	if (parse_mac(mac_text, mac) < 0 || sscanf(addr_text, "%63[0-9.]/%d", ip, &prefix) != 2 ||
	    prefix < 1 || prefix > 32 || inet_pton(AF_INET, ip, &addr) != 1 ||
	    inet_pton(AF_INET, gw_text, &gw) != 1 ||
	    (gw_mac_text != NULL && parse_mac(gw_mac_text, gw_mac) < 0)) {
		snprintf(why, size, "MAC, ADDR (a.b.c.d/n), GATEWAY or GATEWAY_MAC malformed");
		errno = EINVAL;
		return -1;
	}
	mask.s_addr = htonl(0xffffffffu << (32 - prefix));
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		snprintf(why, size, "socket: %s", strerror(errno));
		return -1;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, IFNAMSIZ, "eth0");
	const char *step = "SIOCSIFHWADDR";
	ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
	memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
	if (ioctl(s, SIOCSIFHWADDR, &ifr) < 0)
		goto failed;
	step = "SIOCSIFADDR"; /* replaces the primary address: the old one is gone */
	set_in(&ifr.ifr_addr, addr);
	if (ioctl(s, SIOCSIFADDR, &ifr) < 0)
		goto failed;
	step = "SIOCSIFNETMASK";
	set_in(&ifr.ifr_netmask, mask);
	if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0)
		goto failed;
	step = "SIOCGIFFLAGS";
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		goto failed;
	step = "SIOCSIFFLAGS";
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		goto failed;
	struct rtentry rt;
	memset(&rt, 0, sizeof(rt));
	struct in_addr any = {.s_addr = 0};
	set_in(&rt.rt_dst, any);
	set_in(&rt.rt_genmask, any);
	set_in(&rt.rt_gateway, gw);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = ifr.ifr_name;
	step = "SIOCADDRT default";
	if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
		goto failed;
	/* Not a failure of the identity: without the entry, the kernel asks (ARP) as usual. */
	if (gw_mac_text != NULL && set_gateway_neighbour(s, gw, gw_mac) < 0)
		fprintf(stderr, "hatch-agent: SIOCSARP gateway: %s\n", strerror(errno));
	close(s);
	return 0;
failed:
	snprintf(why, size, "%s eth0: %s", step, strerror(errno));
	int err = errno;
	close(s);
	errno = err;
	return -1;
}

/* Whether pid is a running dropbear (its pid file may be stale, its pid reused). */
static int is_dropbear(pid_t pid)
{
	char path[64], comm[32] = "";
	snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
	FILE *f = fopen(path, "re");
	if (f == NULL)
		return 0;
	int yes = fgets(comm, sizeof(comm), f) != NULL && strcmp(comm, "dropbear\n") == 0;
	fclose(f);
	return yes;
}

/* The SSH host keys go, and dropbear is killed (init starts it again; with -R it makes new
 * keys, from the reseeded RNG, at its first connection). Its pid file names the listener
 * (no walk of /proc, which costs a freshly restored guest tens of milliseconds); without
 * one, every dropbear found in /proc is killed. SIGKILL, not SIGTERM: a dropbear frozen
 * while it was still starting (a template made right after boot) notes a SIGTERM and goes
 * on into its loop, where the next connection makes it exit, resetting that connection. */
static void reset_ssh(void)
{
	DIR *d = opendir("/etc/dropbear");
	struct dirent *e;
	while (d != NULL && (e = readdir(d)) != NULL) {
		size_t n = strlen(e->d_name);
		if (strncmp(e->d_name, "dropbear_", 9) == 0 && n > 9 + 9 &&
		    strcmp(e->d_name + n - 9, "_host_key") == 0 &&
		    unlinkat(dirfd(d), e->d_name, 0) < 0)
			fprintf(stderr, "hatch-agent: unlink %s: %s\n", e->d_name, strerror(errno));
	}
	if (d != NULL)
		closedir(d);
	int pid = 0;
	FILE *f = fopen("/var/run/dropbear.pid", "re");
	if (f != NULL) {
		if (fscanf(f, "%d", &pid) != 1)
			pid = 0;
		fclose(f);
	}
	if (pid > 1 && is_dropbear(pid)) {
		kill(pid, SIGKILL);
		return;
	}
	d = opendir("/proc");
	while (d != NULL && (e = readdir(d)) != NULL) {
		pid = atoi(e->d_name);
		if (pid > 1 && is_dropbear(pid))
			kill(pid, SIGKILL);
	}
	if (d != NULL)
		closedir(d);
}

/* The files that name the machine; why says which failed. */
static int write_identity_files(const char *name, const char *machine, char *why, size_t size)
{
	char text[400];
	const char *path = "/etc/hostname";
	snprintf(text, sizeof(text), "%s\n", name);
	if (put_file(path, text) < 0)
		goto failed;
	path = "/etc/hosts";
	snprintf(text, sizeof(text), "127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost\n", name);
	if (put_file(path, text) < 0)
		goto failed;
	path = "/etc/machine-id";
	snprintf(text, sizeof(text), "%s\n", machine);
	if (put_file(path, text) < 0)
		goto failed;
	return 0;
failed:;
	int err = errno;
	snprintf(why, size, "%s: %s", path, strerror(err));
	errno = err;
	return -1;
}

/* The hostname, the network and SSH first, then the files. A request with WINDOW (hatchd
 * from agent 5 on) is answered twice: a first frame once nothing of the old identity can
 * reach the network any more (hatchd plugs the NIC in then), and the END once the files are
 * written too. The first write to the disk's file system costs a freshly restored guest some
 * 30 ms: that much of hatchd's plugging in and answering, and of the first request reaching
 * the guest, happens meanwhile. The agent keeps its priority, so the guest's own processes
 * (which may read these files) run only once they are written. */
static void identity(uint32_t id, const unsigned char *p, uint32_t len)
{
	int bad = 0;
	char *name = get_text(p, len, TAG_NAME, &bad);
	char *machine = get_text(p, len, TAG_MACHINE_ID, &bad);
	char *addr = get_text(p, len, TAG_ADDR, &bad);
	char *mac = get_text(p, len, TAG_MAC, &bad);
	char *gw = get_text(p, len, TAG_GATEWAY, &bad);
	char *gw_mac = get_text(p, len, TAG_GATEWAY_MAC, &bad);
	int64_t window = 0;
	int early = get_int(p, len, TAG_WINDOW, &window) == 1 && window >= 1;
	char why[160] = "";
	if (bad || name == NULL || machine == NULL || strlen(name) > 63 || strlen(machine) > 64 ||
	    strchr(name, '\n') || strchr(machine, '\n') ||
	    (addr != NULL && (mac == NULL || gw == NULL)) || (gw_mac != NULL && addr == NULL)) {
		fail(id, E_BAD_FIELD, 0, "identity needs NAME and MACHINE_ID, and MAC and GATEWAY "
					 "with ADDR (and GATEWAY_MAC only with ADDR)");
		goto done;
	}
	int err = 0;
	if (sethostname(name, strlen(name)) < 0) {
		err = errno;
		snprintf(why, sizeof(why), "sethostname: %s", strerror(err));
	}
	if (!err && addr != NULL && set_address(mac, addr, gw, gw_mac, why, sizeof(why)) < 0)
		err = errno;
	if (err) {
		fail(id, E_FAILED, err, "%s", why);
		goto done;
	}
	reset_ssh();
	if (early) {
		begin(T_IDENTITY | T_REPLY, id, 0);
		queue_frame();
		flush_out();
	}
	if (write_identity_files(name, machine, why, sizeof(why)) < 0) {
		fail(id, E_FAILED, errno, "%s", why);
	} else {
		begin(T_IDENTITY | T_REPLY, id, 1);
		queue_frame();
	}
done:
	free(name);
	free(machine);
	free(addr);
	free(mac);
	free(gw);
	free(gw_mac);
}

static void credit(uint32_t id, const unsigned char *p, uint32_t len)
{
	struct session *s = find_session(id);
	int64_t n = 0;
	if (s != NULL && get_int(p, len, TAG_CREDIT, &n) == 1 && n > 0)
		s->credit = s->credit + n > MAX_CREDIT ? MAX_CREDIT : s->credit + n;
}

static void handle(int type, uint32_t id, int end, const unsigned char *p, uint32_t len)
{
	if (!well_formed(p, len)) {
		if (type != T_INPUT && type != T_CREDIT && type != T_CANCEL)
			fail(id, E_BAD_FIELD, 0, "malformed fields");
		return;
	}
	struct session *s;
	switch (type) {
	case T_HELLO:
		hello(id);
		break;
	case T_PING:
		ping(id, p, len);
		break;
	case T_SYNC:
		sync_clock_and_rng(id, p, len);
		break;
	case T_INPUT:
		input(id, end, p, len);
		break;
	case T_CREDIT:
		credit(id, p, len);
		break;
	case T_CANCEL:
		if ((s = find_session(id)) != NULL)
			end_session(s);
		break;
	case T_EXEC:
		exec_request(id, p, len);
		break;
	case T_PROC_LIST:
		proc_list(id);
		break;
	case T_PROC_GET:
		proc_get(id, p, len);
		break;
	case T_PROC_KILL:
		proc_kill(id, p, len);
		break;
	case T_FILE_READ:
		file_read(id, p, len);
		break;
	case T_FILE_WRITE:
		file_write(id, p, len);
		break;
	case T_FILE_STAT:
		file_stat(id, p, len);
		break;
	case T_FILE_LIST:
		file_list(id, p, len);
		break;
	case T_IDENTITY:
		identity(id, p, len);
		break;
	case T_FILE_DELETE:
		file_delete(id, p, len);
		break;
	default:
		fail(id, E_UNSUPPORTED, 0, "unknown message type 0x%02x", type);
	}
}

/* ---- the byte stream ------------------------------------------------------------------- */

static int valid_header(const unsigned char *h)
{
	return h[0] == 'H' && h[1] == 'V' && get16(h + 10) == 0 && get32(h + 12) <= MAX_PAYLOAD;
}

/* Drop bytes up to the next possible frame start (a magic after the first byte). */
static void skip_garbage(void)
{
	size_t at = 1;
	while (at < have && !(in[at] == 'H' && (at + 1 == have || in[at + 1] == 'V')))
		at++;
	memmove(in, in + at, have - at);
	have -= at;
}

/* Handle the complete frames read so far, while there is room for an answer to each. */
static void process(void)
{
	int complained = 0;
	while (have >= HEADER && room() >= OUT_FRAME) {
		if (!valid_header(in)) {
			if (!complained++)
				fail(0, E_BAD_FRAME, 0, "invalid frame header; skipping to the next");
			skip_garbage();
			continue;
		}
		uint32_t len = get32(in + 12);
		if (have < HEADER + len)
			return; /* the rest is on its way */
		uint32_t id = get32(in + 4);
		if (in[2] != VERSION)
			fail(id, E_VERSION, 0, "this agent speaks protocol version 1");
		else
			handle(in[3], id, get16(in + 8) & F_END, in + HEADER, len);
		memmove(in, in + HEADER + len, have - HEADER - len);
		have -= HEADER + len;
	}
}

/* hatchd went away: whatever its requests started is over, and nobody will read the
 * answers still queued. Background processes run on. */
static void host_gone(void)
{
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (sessions[i].kind != S_FREE)
			end_session(&sessions[i]);
	have = 0;
	oq_head = oq_tail = oq_left = 0;
	connected = 0;
}

/* ---- children and the clock -------------------------------------------------------------- */

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_SESSIONS; i++) {
			struct session *s = &sessions[i];
			if (s->kind == S_EXEC && s->started && !s->reaped && s->pid == pid) {
				s->reaped = 1;
				s->status = status;
				s->linger = now_ms() + LINGER_MS;
			}
		}
		struct proc *proc = find_proc(pid);
		if (proc != NULL && proc->running) {
			proc->running = 0;
			proc->status = status;
			proc->ended_ns = wall_ns();
		}
	}
}

static void timeouts(int64_t now)
{
	for (int i = 0; i < MAX_SESSIONS; i++) {
		struct session *s = &sessions[i];
		if (s->kind == S_EXEC && s->started && !s->reaped && s->deadline && now >= s->deadline) {
			kill(-s->pid, SIGKILL);
			s->timed_out = 1;
			s->deadline = 0;
		}
	}
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *p = &procs[i];
		if (p->used && p->running && p->deadline && now >= p->deadline) {
			kill(-p->pid, SIGKILL);
			p->timed_out = 1;
			p->deadline = 0;
		}
	}
}

static int64_t sooner(int64_t wait, int64_t until, int64_t now)
{
	if (!until)
		return wait;
	int64_t left = until > now ? until - now : 0;
	return wait < 0 || left < wait ? left : wait;
}

/* ---- the loop ----------------------------------------------------------------------------- */

static int can_finish(const struct session *s, int64_t now)
{
	return s->kind == S_EXEC && s->started && s->reaped && room() >= OUT_FRAME &&
	       ((s->out[0] < 0 && s->out[1] < 0) || now >= s->linger);
}

static int producer(const struct session *s)
{
	return s->kind == S_READ || s->kind == S_LIST || s->kind == S_PROC;
}

/* Data goes out only with credit and two frames of room (one is kept for answers). */
static int may_send(const struct session *s)
{
	return s->credit > 0 && room() >= 2 * OUT_FRAME;
}

/* Sessions that can go on without waiting for a descriptor: one frame each. */
static void advance_sessions(int64_t now)
{
	for (int i = 0; i < MAX_SESSIONS; i++) {
		struct session *s = &sessions[i];
		if (can_finish(s, now))
			exec_finish(s);
		else if (producer(s) && may_send(s) && s->kind == S_READ)
			read_produce(s);
		else if (producer(s) && may_send(s) && s->kind == S_LIST)
			list_produce(s);
		else if (producer(s) && may_send(s))
			proc_produce(s);
	}
}

/* Whether a session could go on right now (the loop must not sleep). */
static int sessions_ready(int64_t now)
{
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (can_finish(&sessions[i], now) || (producer(&sessions[i]) && may_send(&sessions[i])))
			return 1;
	return 0;
}

enum { MAX_FDS = 2 + 2 * MAX_SESSIONS + 2 * MAX_PROCS + 1 };

static int serve(const char *name)
{
	struct pollfd fds[MAX_FDS];
	for (;;) {
		int64_t now = now_ms();
		if (!connected) { /* stdio is always connected */
			ssize_t got = read(port_in, in, sizeof(in));
			if (got > 0) {
				connected = 1;
				have = got;
			} else if (got < 0 && errno == EAGAIN) {
				connected = 1;
			}
		}
		timeouts(now);
		if (connected && flush_out() < 0) {
			if (stdio_mode)
				return 0;
			host_gone();
		}
		process();
		advance_sessions(now);
		if (connected && flush_out() < 0 && !stdio_mode)
			host_gone();
		int ready = sessions_ready(now_ms());

		int n = 0, port_at = -1;
		int64_t wait = ready ? 0 : -1;
		fds[n++] = (struct pollfd){.fd = sigfd, .events = POLLIN};
		if (connected) {
			short want = have < sizeof(in) && room() >= OUT_FRAME ? POLLIN : 0;
			short out = oq_tail > oq_head ? POLLOUT : 0;
			port_at = n;
			if (stdio_mode) {
				fds[n++] = (struct pollfd){.fd = want ? port_in : -1, .events = want};
				fds[n++] = (struct pollfd){.fd = out ? port_out : -1, .events = out};
			} else {
				/* always polled: POLLHUP says hatchd went away */
				fds[n++] = (struct pollfd){.fd = port_in, .events = want | out};
			}
		} else {
			wait = sooner(wait, now + 1000, now); /* in case a SIGIO was missed */
		}
		int first_pipe = n;
		for (int i = 0; i < MAX_SESSIONS; i++) {
			struct session *s = &sessions[i];
			if (s->kind != S_EXEC || !s->started)
				continue;
			for (int k = 0; k < 2; k++) {
				int discard = s->limit >= 0 && s->sent[k] >= s->limit;
				int want = discard || (s->credit > 0 && room() >= 2 * OUT_FRAME);
				fds[n++] = (struct pollfd){
					.fd = s->out[k] >= 0 && want ? s->out[k] : -1, .events = POLLIN};
			}
			if (s->reaped)
				wait = sooner(wait, s->linger, now);
			else
				wait = sooner(wait, s->deadline, now);
		}
		int first_proc = n;
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			for (int k = 0; k < 2; k++)
				fds[n++] = (struct pollfd){.fd = p->used ? p->out[k] : -1,
							   .events = POLLIN};
			if (p->used && p->running)
				wait = sooner(wait, p->deadline, now);
		}
		if (poll(fds, n, wait > INT32_MAX ? INT32_MAX : (int)wait) < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "hatch-agent: poll: %s\n", strerror(errno));
			return 1;
		}

		if (fds[0].revents & POLLIN) {
			struct signalfd_siginfo info;
			while (read(sigfd, &info, sizeof(info)) == sizeof(info))
				if (info.ssi_signo == SIGCHLD)
					reap();
			reap();
		}
		/* pipes before the port: what a command wrote is answered before a cancel is read */
		int at = first_pipe;
		for (int i = 0; i < MAX_SESSIONS; i++) {
			struct session *s = &sessions[i];
			if (s->kind != S_EXEC || !s->started)
				continue;
			for (int k = 0; k < 2; k++, at++)
				if (fds[at].fd >= 0 && fds[at].revents && s->out[k] == fds[at].fd &&
				    (s->credit > 0 || (s->limit >= 0 && s->sent[k] >= s->limit)) &&
				    room() >= 2 * OUT_FRAME)
					exec_read(s, k);
		}
		at = first_proc;
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			for (int k = 0; k < 2; k++, at++) {
				if (fds[at].fd < 0 || !fds[at].revents || p->out[k] != fds[at].fd)
					continue;
				ssize_t got = read(p->out[k], scratch, sizeof(scratch));
				if (got > 0) {
					ring_add(&p->ring[k], scratch, got);
				} else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
					close(p->out[k]);
					p->out[k] = -1;
				}
			}
		}

		if (!connected)
			continue;
		short ev = port_at >= 0 ? fds[port_at].revents : 0;
		if (!stdio_mode && (ev & (POLLHUP | POLLERR))) {
			host_gone();
			continue;
		}
		if (ev & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t got = read(port_in, in + have, sizeof(in) - have);
			if (got > 0) {
				have += got;
			} else if (got == 0) {
				if (stdio_mode)
					return 0;
				host_gone();
			} else if (errno != EAGAIN && errno != EINTR) {
				fprintf(stderr, "hatch-agent: read %s: %s\n", name, strerror(errno));
				return 1;
			}
		}
	}
}

/* ---- the port -------------------------------------------------------------------------- */

static int find_port(char *dev, size_t size)
{
	DIR *dir = opendir(PORTS_DIR);
	if (dir == NULL)
		return -1;
	struct dirent *e;
	int found = -1;
	while (found < 0 && (e = readdir(dir)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		char path[300], name[64] = "";
		snprintf(path, sizeof(path), PORTS_DIR "/%s/name", e->d_name);
		FILE *f = fopen(path, "re");
		if (f == NULL)
			continue;
		if (fgets(name, sizeof(name), f) != NULL) {
			name[strcspn(name, "\n")] = 0;
			if (strcmp(name, PORT_NAME) == 0) {
				snprintf(dev, size, "/dev/%s", e->d_name);
				found = 0;
			}
		}
		fclose(f);
	}
	closedir(dir);
	return found;
}

/* Whatever is still queued, written out before exiting (stdio mode: the tests read it). */
static void drain_out(void)
{
	fcntl(port_out, F_SETFL, fcntl(port_out, F_GETFL) & ~O_NONBLOCK);
	flush_out();
}

/* Right after a restore or a fork, hatchd waits on this agent (the clock, a child's new
 * address) while everything else in the guest wakes too: it goes first (under TCG a fork's
 * child was re-made 20-40 ms sooner, and a restore's sync answered sooner). What it starts
 * does not: commands run at the default priority (SCHED_RESET_ON_FORK). */
static void raise_priority(void)
{
	struct sched_param param = {0};
	if (setpriority(PRIO_PROCESS, 0, -20) < 0 ||
	    sched_setscheduler(0, SCHED_OTHER | SCHED_RESET_ON_FORK, &param) < 0)
		fprintf(stderr, "hatch-agent: priority: %s\n", strerror(errno));
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--version") == 0) {
		printf("%s (protocol %d)\n", AGENT_NAME, VERSION);
		return 0;
	}
	/* SIGIO (the port: hatchd connected, or sent data) and SIGCHLD are only ever read from
	 * a signalfd, never delivered. A closed pipe or socket is an error, not a death. */
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGIO);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);
	sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sigfd < 0) {
		fprintf(stderr, "hatch-agent: signalfd: %s\n", strerror(errno));
		return 1;
	}
	const char *name = "stdin";
	char dev[320];
	if (argc > 1 && strcmp(argv[1], "--stdio") == 0) {
		stdio_mode = connected = 1;
		port_in = 0;
		port_out = 1;
		fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
		fcntl(1, F_SETFL, fcntl(1, F_GETFL) | O_NONBLOCK);
	} else {
		raise_priority();
		for (int said = 0; find_port(dev, sizeof(dev)) < 0; said = 1) {
			if (!said)
				fprintf(stderr,
					"hatch-agent: no virtio port named " PORT_NAME "; waiting\n");
			sleep(5);
		}
		int port = open(dev, O_RDWR | O_CLOEXEC | O_NONBLOCK);
		if (port < 0) {
			fprintf(stderr, "hatch-agent: open %s: %s\n", dev, strerror(errno));
			sleep(1); /* init starts us again; not at full speed */
			return 1;
		}
		/* The port signals SIGIO when the host connects and when data arrives. */
		fcntl(port, F_SETOWN, getpid());
		fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC);
		port_in = port_out = port;
		name = dev;
	}
	/* Said unasked (id 0) once per start: hatchd learns that whatever the previous agent
	 * was answering is lost. Queued until hatchd is there. */
	hello(0);
	int rc = serve(name);
	if (stdio_mode) {
		for (int i = 0; i < MAX_SESSIONS; i++)
			if (sessions[i].kind != S_FREE)
				end_session(&sessions[i]);
		drain_out();
	}
	return rc;
}
