/*
 * cnull: the smallest useful xen-disk plugin in C, the C twin of the Rust `discard` plugin.
 * Every read and write succeeds without touching data, so `bench --direct` on it measures
 * the C path through the host itself:
 *
 *   cc -shared -fPIC -O2 -I plugin-api/include -o libcnull.so cnull.c
 *   xen-disk-host bench --direct discard --against ./libcnull.so --rw randread --bs 512
 *
 * Key: size (default 1G).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "xen_disk_plugin.h"

struct cnull {
    int64_t size;
};

static int cnull_config(void **state, const char *key, const char *value)
{
    struct cnull *n = *state;
    if (n == NULL) {
        n = calloc(1, sizeof *n);
        if (n == NULL)
            return -ENOMEM;
        *state = n;
    }
    if (strcmp(key, "size") == 0) {
        n->size = strtoll(value, NULL, 10); /* the host passes sizes as decimal bytes */
        return 0;
    }
    return -EINVAL;
}

static void *cnull_open(void *state) { return state; }
static void cnull_close(void *handle) { free(handle); }
static int64_t cnull_get_size(void *handle) { return ((struct cnull *)handle)->size; }

static int64_t cnull_pread(void *handle, void *buf, uint32_t count, uint64_t offset)
{
    (void)handle, (void)buf, (void)offset;
    return count;
}

static int64_t cnull_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                            uint32_t flags)
{
    (void)handle, (void)buf, (void)offset, (void)flags;
    return count;
}

static const struct xen_disk_config_key keys[] = {
    { "size", XEN_DISK_KEY_SIZE, 0, "1G", "Disk size in bytes (suffixes K, M, G, T)" },
    { NULL, 0, 0, NULL, NULL },
};

static const struct xen_disk_plugin plugin = {
    .size = sizeof(struct xen_disk_plugin),
    .api_version = XEN_DISK_API_VERSION,
    .name = "cnull",
    .version = "1.0.0",
    .description = "Null disk in C: reads and writes succeed and touch no data",
    .thread_model = XEN_DISK_THREAD_PARALLEL,
    .config_keys = keys,
    .config = cnull_config,
    .open = cnull_open,
    .close = cnull_close,
    .get_size = cnull_get_size,
    .pread = cnull_pread,
    .pwrite = cnull_pwrite,
};

const struct xen_disk_plugin *xen_disk_plugin_init(const struct xen_disk_host *host)
{
    (void)host;
    return &plugin;
}
