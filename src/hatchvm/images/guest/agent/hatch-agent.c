/*
 * hatch-agent: the guest side of hatchvm's host<->guest channel, protocol version 1.
 * The host side is src/hatchvm/agent/ (protocol.py); docs/agent-protocol.md describes both.
 *
 * Started by busybox init (::respawn:). Serves the virtio-serial port named
 * org.hatchvm.agent.0 (found under /sys/class/virtio-ports, no udev needed):
 *   HELLO  its protocol version and capabilities;
 *   PING   echoes its DATA field;
 *   SYNC   sets the wall clock to the host's time and reseeds the kernel's RNG with the
 *          host's random bytes (after a snapshot restore), answering with the new time.
 *
 * The host is hatchd, but every byte is still checked: frames are bounded (16-byte header,
 * payload <= 64 KiB), a bad header is skipped up to the next magic, a bad field is answered
 * with an ERROR frame. When hatchd goes away, read() returns 0 until it connects again; the
 * port's SIGIO (sent on connect and on data) ends the wait, so there is no busy loop.
 *
 * Built by the image builder: gcc -static -Os. `hatch-agent --stdio` serves stdin/stdout
 * instead of the port, for the host's tests of this parser.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define AGENT_NAME "hatch-agent 1"
#define PORT_NAME "org.hatchvm.agent.0"
#define PORTS_DIR "/sys/class/virtio-ports"
#define VERSION 1
#define HEADER 16
#define MAX_PAYLOAD 65536
#define MAX_ENTROPY 512
#define MIN_ENTROPY 16

enum { T_HELLO = 0x01, T_PING = 0x02, T_SYNC = 0x03, T_ERROR = 0x7f, T_REPLY = 0x80 };
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
};
enum { E_BAD_FRAME = 1, E_UNSUPPORTED = 2, E_BAD_FIELD = 3, E_FAILED = 4, E_VERSION = 5 };

static unsigned char in[HEADER + MAX_PAYLOAD];
static size_t have;
static unsigned char out[HEADER + MAX_PAYLOAD];
static size_t out_len;
static int port_in = -1, port_out = -1;

/* ---- big-endian helpers --------------------------------------------------------------- */

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

/* ---- writing frames -------------------------------------------------------------------- */

static void begin(int type, uint32_t id)
{
	memset(out, 0, HEADER);
	out[0] = 'H';
	out[1] = 'V';
	out[2] = VERSION;
	out[3] = type;
	put32(out + 4, id);
	put16(out + 8, F_END);
	out_len = HEADER;
}

static void add(int tag, const void *value, size_t len)
{
	if (out_len + 6 + len > sizeof(out))
		return; /* never happens with our own fields; a bound all the same */
	put16(out + out_len, tag);
	put32(out + out_len + 2, len);
	memcpy(out + out_len + 6, value, len);
	out_len += 6 + len;
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

/* Whole frame or nothing from our side. A write blocks while hatchd is away (the port
 * waits for the host); it completes when hatchd connects again, which ignores the stale
 * answer. Any other failure means the port is gone: exit and let init start us again. */
static void send_frame(void)
{
	put32(out + 12, out_len - HEADER);
	size_t done = 0;
	while (done < out_len) {
		ssize_t n = write(port_out, out + done, out_len - done);
		if (n > 0) {
			done += n;
		} else if (n < 0 && errno != EINTR) {
			fprintf(stderr, "hatch-agent: write: %s\n", strerror(errno));
			exit(1);
		}
	}
}

static void send_error(uint32_t id, int code, const char *message)
{
	begin(T_ERROR, id);
	add_int(TAG_CODE, code);
	add_text(TAG_MESSAGE, message);
	send_frame();
}

/* ---- reading fields -------------------------------------------------------------------- */

struct field {
	const unsigned char *value;
	uint32_t len;
};

/* The first field with this tag; 0 if absent, -1 if the payload's fields are malformed. */
static int find(const unsigned char *p, uint32_t len, int tag, struct field *f)
{
	uint32_t at = 0;
	int found = 0;
	while (at < len) {
		if (len - at < 6)
			return -1;
		uint16_t t = get16(p + at);
		uint32_t l = get32(p + at + 2);
		if (l > len - at - 6)
			return -1;
		if (t == tag && !found) {
			f->value = p + at + 6;
			f->len = l;
			found = 1;
		}
		at += 6 + l;
	}
	return found;
}

static int64_t as_int(const struct field *f)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | f->value[i];
	return (int64_t)v;
}

/* ---- requests -------------------------------------------------------------------------- */

static void hello(uint32_t id)
{
	begin(T_HELLO | T_REPLY, id);
	add_int(TAG_VERSION, VERSION);
	add_text(TAG_AGENT, AGENT_NAME);
	add_text(TAG_CAP, "ping");
	add_text(TAG_CAP, "sync");
	send_frame();
}

static void ping(uint32_t id, const unsigned char *p, uint32_t len)
{
	struct field data = {0};
	if (find(p, len, TAG_DATA, &data) < 0) {
		send_error(id, E_BAD_FIELD, "malformed fields");
		return;
	}
	begin(T_PING | T_REPLY, id);
	add(TAG_DATA, data.value, data.len);
	send_frame();
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
	if (has_t < 0 || has_e < 0) {
		send_error(id, E_BAD_FIELD, "malformed fields");
		return;
	}
	if (!has_t || t.len != 8 || !has_e || e.len < MIN_ENTROPY || e.len > MAX_ENTROPY) {
		send_error(id, E_BAD_FIELD, "sync needs TIME_NS (8 bytes) and ENTROPY (16-512 bytes)");
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
		char message[200];
		snprintf(message, sizeof(message), "%s%s%s", clock_why,
			 clock_why[0] && rng_why[0] ? "; " : "", rng_why);
		send_error(id, E_FAILED, message);
		return;
	}
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	begin(T_SYNC | T_REPLY, id);
	add_int(TAG_TIME_NS, (int64_t)now.tv_sec * 1000000000 + now.tv_nsec);
	send_frame();
}

static void handle(int type, uint32_t id, const unsigned char *p, uint32_t len)
{
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
	default: {
		char message[64];
		snprintf(message, sizeof(message), "unknown message type 0x%02x", type);
		send_error(id, E_UNSUPPORTED, message);
	}
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

static void process(void)
{
	int complained = 0;
	while (have >= HEADER) {
		if (!valid_header(in)) {
			if (!complained++)
				send_error(0, E_BAD_FRAME, "invalid frame header; skipping to the next");
			skip_garbage();
			continue;
		}
		uint32_t len = get32(in + 12);
		if (have < HEADER + len)
			return; /* the rest is on its way */
		uint32_t id = get32(in + 4);
		if (in[2] != VERSION)
			send_error(id, E_VERSION, "this agent speaks protocol version 1");
		else
			handle(in[3], id, in + HEADER, len);
		memmove(in, in + HEADER + len, have - HEADER - len);
		have -= HEADER + len;
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

/* Read, answer, repeat. read() returns 0 while hatchd is not connected (or at the end of
 * stdin): wait for the port's SIGIO, which comes when the host connects or sends data. */
static int serve(const char *name, int stdio, const sigset_t *io)
{
	for (;;) {
		ssize_t n = read(port_in, in + have, sizeof(in) - have);
		if (n > 0) {
			have += n;
			process();
		} else if (n == 0) {
			if (stdio)
				return 0;
			/* A half-read frame will never be completed. */
			have = 0;
			struct timespec wait = {.tv_sec = 1};
			sigtimedwait(io, NULL, &wait);
		} else if (errno != EINTR) {
			fprintf(stderr, "hatch-agent: read %s: %s\n", name, strerror(errno));
			return 1;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--version") == 0) {
		printf("%s (protocol %d)\n", AGENT_NAME, VERSION);
		return 0;
	}
	/* SIGIO stays blocked: it is only ever waited for, never delivered. */
	sigset_t io;
	sigemptyset(&io);
	sigaddset(&io, SIGIO);
	sigprocmask(SIG_BLOCK, &io, NULL);
	if (argc > 1 && strcmp(argv[1], "--stdio") == 0) {
		port_in = 0;
		port_out = 1;
		return serve("stdin", 1, &io);
	}
	char dev[320];
	for (int said = 0; find_port(dev, sizeof(dev)) < 0; said = 1) {
		if (!said)
			fprintf(stderr, "hatch-agent: no virtio port named " PORT_NAME "; waiting\n");
		sleep(5);
	}
	int port = open(dev, O_RDWR | O_CLOEXEC);
	if (port < 0) {
		fprintf(stderr, "hatch-agent: open %s: %s\n", dev, strerror(errno));
		sleep(1); /* init starts us again; not at full speed */
		return 1;
	}
	/* The port signals SIGIO when the host connects and when data arrives. */
	fcntl(port, F_SETOWN, getpid());
	fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC);
	port_in = port_out = port;
	return serve(dev, 0, &io);
}
