/*
 * A hostile guest agent for hatchvm's tests: it takes the agent's port, says hello with the
 * exec and files capabilities, and answers an EXEC by its first argument:
 *   flood     endless output frames, ignoring the credit hatchd granted
 *   endless   endless output frames within the credit (a command that never ends)
 *   stall     one output frame, then nothing for this request (other requests still answered)
 *   oversize  a frame header claiming 4 GiB
 *   garbage   random bytes, forever
 *   badexit   an exit with both an exit code and a signal
 * Anything else gets an exit code 0 at once. A misbehaviour lasts until hatchd hangs up (or
 * cancels, for endless); the next request is served afresh. Built statically by the test and
 * uploaded into the guest.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int port = -1;
static unsigned char in[16 + 65536];
static unsigned char out[65536];
static size_t olen;
static int64_t credit;

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v;
}

static void begin(int type, uint32_t id, int end)
{
	memset(out, 0, 16);
	out[0] = 'H', out[1] = 'V', out[2] = 1, out[3] = type;
	put32(out + 4, id);
	out[9] = end;
	olen = 16;
}

static void add(int tag, const void *v, uint32_t len)
{
	out[olen] = tag >> 8, out[olen + 1] = tag;
	put32(out + olen + 2, len);
	memcpy(out + olen + 6, v, len);
	olen += 6 + len;
}

static void add_int(int tag, int64_t v)
{
	unsigned char b[8];
	for (int i = 0; i < 8; i++)
		b[i] = (uint64_t)v >> (56 - 8 * i);
	add(tag, b, 8);
}

/* Wait for the port; 0 once it is ready for events, -1 when hatchd hung up. */
static int wait_port(short events)
{
	struct pollfd p = {.fd = port, .events = events};
	poll(&p, 1, 1000);
	return p.revents & POLLHUP ? -1 : 0;
}

/* Everything, in writes of at most 32 KiB; -1 when hatchd hung up meanwhile. */
static int put_all(const void *data, size_t n)
{
	const unsigned char *p = data;
	while (n > 0) {
		ssize_t w = write(port, p, n > 32768 ? 32768 : n);
		if (w > 0) {
			p += w;
			n -= w;
		} else if (w == 0 || errno == EAGAIN) {
			if (wait_port(POLLOUT) < 0)
				return -1;
		} else if (errno != EINTR) {
			exit(1);
		}
	}
	return 0;
}

static int send_frame(void)
{
	put32(out + 12, olen - 16);
	return put_all(out, olen);
}

static void hello(uint32_t id)
{
	begin(0x81, id, 1);
	add_int(1, 1);
	add(2, "hostile 1", 9);
	add(3, "exec", 4);
	add(3, "files", 5);
	add(3, "ping", 4);
	add(3, "sync", 4);
	send_frame();
}

static int output(uint32_t id)
{
	static unsigned char data[30000];
	memset(data, 'x', sizeof(data));
	begin(0x90, id, 0);
	add_int(18, 1);
	add(4, data, sizeof(data));
	return send_frame();
}

/* The next frame into `in` (waiting for hatchd as long as it takes); -1 on garbage. */
static int read_frame(void)
{
	size_t have = 0;
	while (have < 16 || have < 16 + get32(in + 12)) {
		ssize_t n = read(port, in + have, (have < 16 ? 16 : 16 + get32(in + 12)) - have);
		if (n > 0)
			have += n;
		else if (n == 0)
			usleep(50000); /* hatchd not connected: wait for it */
		else if (errno == EAGAIN)
			wait_port(POLLIN);
		else if (errno != EINTR)
			exit(1);
		if (have >= 16 && (in[0] != 'H' || in[1] != 'V' || get32(in + 12) > 65536))
			return -1;
	}
	return 0;
}

/* The first ARGV (tag 9) of the request in `in`. */
static void first_arg(char *arg, size_t size)
{
	uint32_t len = get32(in + 12), at = 0;
	arg[0] = 0;
	while (at + 6 <= len) {
		int tag = in[16 + at] << 8 | in[16 + at + 1];
		uint32_t l = get32(in + 16 + at + 2);
		if (tag == 9) {
			snprintf(arg, size, "%.*s", (int)l, (const char *)in + 16 + at + 6);
			return;
		}
		at += 6 + l;
	}
}

/* Whatever hatchd sent meanwhile, without waiting: credit counted; 1 on a CANCEL. */
static int take_credit(uint32_t id)
{
	for (;;) {
		ssize_t n = read(port, in, 16);
		if (n < 16)
			return 0;
		uint32_t len = get32(in + 12);
		if (len > 0 && read(port, in + 16, len) != (ssize_t)len)
			return 0;
		if (get32(in + 4) != id)
			continue;
		if (in[3] == 0x06)
			return 1;
		if (in[3] == 0x05)
			credit += in[16 + 6 + 7];
	}
}

int main(void)
{
	char dev[300] = "";
	while (!dev[0]) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d)) != NULL) {
			char path[600], name[64] = "";
			snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
			FILE *f = fopen(path, "r");
			if (f && fgets(name, sizeof(name), f) && !strncmp(name, "org.hatchvm.agent.0", 19))
				snprintf(dev, sizeof(dev), "/dev/%s", e->d_name);
			if (f)
				fclose(f);
		}
		if (d)
			closedir(d);
	}
	while ((port = open(dev, O_RDWR | O_NONBLOCK)) < 0) /* until the real agent is gone */
		usleep(100000);
	hello(0);
	for (;;) {
		if (read_frame() < 0)
			continue; /* garbage from hatchd's side: never expected */
		uint32_t id = get32(in + 4);
		int type = in[3];
		char arg[64];
		if (type == 0x01) {
			hello(id);
		} else if (type == 0x10) {
			first_arg(arg, sizeof(arg));
			begin(0x90, id, 0); /* started */
			add_int(23, 4242);
			send_frame();
			if (!strcmp(arg, "flood")) {
				while (output(id) == 0)
					;
			} else if (!strcmp(arg, "endless")) {
				for (credit = 11; !take_credit(id);) {
					if (credit > 0 && output(id) < 0)
						break;
					if (credit > 0)
						credit--;
					else if (wait_port(POLLIN) < 0)
						break;
				}
			} else if (!strcmp(arg, "stall")) {
				output(id); /* and nothing more for this one */
			} else if (!strcmp(arg, "oversize")) {
				unsigned char h[16] = {'H', 'V', 1, 0x90, 0, 0, 0, 0,
						       0,   0,   0, 0,    0xff, 0xff, 0xff, 0xff};
				put32(h + 4, id);
				put_all(h, 16);
			} else if (!strcmp(arg, "garbage")) {
				unsigned char junk[4096];
				for (unsigned i = 0;; i++) {
					for (size_t k = 0; k < sizeof(junk); k++)
						junk[k] = (unsigned char)(i * 7919 + k * 31);
					if (put_all(junk, sizeof(junk)) < 0)
						break;
				}
			} else if (!strcmp(arg, "badexit")) {
				begin(0x90, id, 1);
				add_int(19, 0);
				add_int(20, 9);
				send_frame();
			} else {
				begin(0x90, id, 1);
				add_int(19, 0);
				add_int(21, 0);
				send_frame();
			}
		} else if (type != 0x04 && type != 0x05 && type != 0x06) {
			begin(0x7f, id, 1);
			add_int(7, 2);
			add(8, "no", 2);
			send_frame();
		}
	}
}
