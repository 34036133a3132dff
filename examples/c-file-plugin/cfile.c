/*
 * cfile: a complete xen-disk plugin in C. It serves a file (or a block device) as the
 * guest's disk, with flush, discard and write-zeroes.
 *
 *   cc -shared -fPIC -O2 -Wall -I plugin-api/include -o libcfile.so cfile.c
 *   xen-disk-host check --destructive ./libcfile.so -c path=scratch.img
 *
 * Keys: path (required), readonly (default false).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "xen_disk_plugin.h"

static const struct xen_disk_host *host;

/* What config collects for one disk, before open. */
struct cfile_config {
    char *path;
    int readonly;
};

struct cfile_disk {
    int fd;
};

static void fail(const char *what, const char *path, int err)
{
    char msg[512];
    snprintf(msg, sizeof msg, "%s: %s: %s", path, what, strerror(err));
    host->set_error(msg);
}

static int cfile_config(void **state, const char *key, const char *value)
{
    struct cfile_config *c = *state;
    if (c == NULL) {
        c = calloc(1, sizeof *c);
        if (c == NULL)
            return -ENOMEM;
        *state = c;
    }
    if (strcmp(key, "path") == 0) {
        free(c->path);
        c->path = strdup(value);
        return c->path ? 0 : -ENOMEM;
    }
    if (strcmp(key, "readonly") == 0) {
        c->readonly = strcmp(value, "true") == 0;
        return 0;
    }
    /* The host passes declared keys only; anything else is a bug worth refusing. */
    host->set_error("unknown key");
    return -EINVAL;
}

static void cfile_config_free(void *state)
{
    struct cfile_config *c = state;
    if (c) {
        free(c->path);
        free(c);
    }
}

static void *cfile_open(void *state)
{
    struct cfile_config *c = state;
    struct cfile_disk *d = NULL;
    int fd;

    if (c == NULL || c->path == NULL) {
        host->set_error("config key `path` is required");
        cfile_config_free(c);
        return NULL;
    }
    fd = open(c->path, (c->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
        fail("open", c->path, errno);
        cfile_config_free(c);
        return NULL;
    }
    d = malloc(sizeof *d);
    if (d == NULL) {
        close(fd);
        cfile_config_free(c);
        return NULL;
    }
    d->fd = fd;
    cfile_config_free(c);
    return d;
}

static void cfile_close(void *handle)
{
    struct cfile_disk *d = handle;
    close(d->fd);
    free(d);
}

static int64_t cfile_get_size(void *handle)
{
    struct cfile_disk *d = handle;
    struct stat st;
    if (fstat(d->fd, &st) < 0)
        return -errno;
    if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(d->fd, 0, SEEK_END);
        return end < 0 ? -errno : end / 512 * 512;
    }
    return st.st_size / 512 * 512;
}

static int64_t cfile_pread(void *handle, void *buf, uint32_t count, uint64_t offset)
{
    struct cfile_disk *d = handle;
    uint32_t done = 0;
    while (done < count) {
        ssize_t n = pread(d->fd, (char *)buf + done, count - done, offset + done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0) /* past the end of the file: the file shrank */
            return -EIO;
        done += n;
    }
    return count;
}

static int64_t cfile_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                            uint32_t flags)
{
    struct cfile_disk *d = handle;
    uint32_t done = 0;
    while (done < count) {
        ssize_t n = pwrite(d->fd, (const char *)buf + done, count - done, offset + done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        done += n;
    }
    if ((flags & XEN_DISK_FUA) && fdatasync(d->fd) < 0)
        return -errno;
    return count;
}

static int cfile_flush(void *handle)
{
    struct cfile_disk *d = handle;
    return fdatasync(d->fd) < 0 ? -errno : 0;
}

/* Writes zeroes where the filesystem cannot punch or zero a range. */
static int write_zeroes(int fd, uint64_t count, uint64_t offset)
{
    static const char zeroes[65536];
    while (count > 0) {
        size_t n = count < sizeof zeroes ? count : sizeof zeroes;
        ssize_t w = pwrite(fd, zeroes, n, offset);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -errno;
        count -= w;
        offset += w;
    }
    return 0;
}

static int cfile_trim(void *handle, uint64_t count, uint64_t offset)
{
    struct cfile_disk *d = handle;
    if (fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count) == 0)
        return 0;
    if (errno != EOPNOTSUPP)
        return -errno;
    return write_zeroes(d->fd, count, offset);
}

static int cfile_zero(void *handle, uint64_t count, uint64_t offset)
{
    struct cfile_disk *d = handle;
    if (fallocate(d->fd, FALLOC_FL_ZERO_RANGE, offset, count) == 0)
        return 0;
    if (errno != EOPNOTSUPP)
        return -errno;
    return write_zeroes(d->fd, count, offset);
}

static const struct xen_disk_config_key keys[] = {
    { "path", XEN_DISK_KEY_PATH, 1, NULL, "The image file or block device" },
    { "readonly", XEN_DISK_KEY_BOOL, 0, "false", "Open it read-only" },
    { NULL, 0, 0, NULL, NULL },
};

static const struct xen_disk_plugin plugin = {
    .size = sizeof(struct xen_disk_plugin),
    .api_version = XEN_DISK_API_VERSION,
    .name = "cfile",
    .version = "1.0.0",
    .description = "A file or block device as a disk (the example C plugin)",
    .thread_model = XEN_DISK_THREAD_PARALLEL,
    .sector_size = 512,
    .can_fua = 1,
    .config_keys = keys,
    .config = cfile_config,
    .config_free = cfile_config_free,
    .open = cfile_open,
    .close = cfile_close,
    .get_size = cfile_get_size,
    .pread = cfile_pread,
    .pwrite = cfile_pwrite,
    .flush = cfile_flush,
    .trim = cfile_trim,
    .zero = cfile_zero,
};

const struct xen_disk_plugin *xen_disk_plugin_init(const struct xen_disk_host *h)
{
    host = h;
    return &plugin;
}
