/*
 * xen_disk_plugin.h: the C interface of xen-disk plugins (plugin API 1.1).
 *
 * A C plugin is a shared library exporting one function, xen_disk_plugin_init, which
 * returns a struct xen_disk_plugin: a description of the plugin and its callbacks. The host
 * (xen-disk-host) loads it with --plugin ./libNAME.so or by NAME from its search path, as it
 * loads plugins written in Rust. See docs/c-plugins.md for the guide, and
 * examples/c-ramdisk/ for a complete plugin.
 *
 * Compatibility: a plugin built with this header for API 1.x loads in every host that
 * speaks 1.y, y >= x, without a rebuild. The struct starts with its own size and the API
 * version it was built for; fields are only ever added at its end, so the host reads
 * exactly what the plugin's struct holds and treats what lies beyond as absent.
 *
 * Errors are errno values: a callback returns 0 (or, for pread/pwrite, the byte count) on
 * success and a negative errno (-EIO, -ENOSPC, -EOPNOTSUPP, ...) on failure. Any other value
 * (a wrong byte count, a positive or unknown error code) fails that request with EIO and is
 * logged; it never reaches the guest as data. xen_disk_host.set_error attaches a message.
 */
#ifndef XEN_DISK_PLUGIN_H
#define XEN_DISK_PLUGIN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define XEN_DISK_API_MAJOR 1
#define XEN_DISK_API_MINOR 1
#define XEN_DISK_API_VERSION ((XEN_DISK_API_MAJOR << 16) | XEN_DISK_API_MINOR)

/* How the host may call one open disk. */
enum xen_disk_thread_model {
    /* One call at a time per disk: the host holds a lock around each call. */
    XEN_DISK_THREAD_SERIALIZED = 0,
    /* Any number of calls at once, from several threads. */
    XEN_DISK_THREAD_PARALLEL = 1,
};

/* The type of a configuration value: the host checks it before calling config. */
enum xen_disk_key_type {
    XEN_DISK_KEY_STRING = 0,
    XEN_DISK_KEY_PATH = 1,
    XEN_DISK_KEY_BOOL = 2,    /* passed to config as "true" or "false" */
    XEN_DISK_KEY_INTEGER = 3, /* passed as decimal digits */
    XEN_DISK_KEY_SIZE = 4,    /* "64M" on the command line; passed as bytes, in decimal */
};

/* One configuration key. The array of them ends with an entry whose name is NULL. */
struct xen_disk_config_key {
    const char *name;
    uint32_t type;              /* enum xen_disk_key_type */
    uint32_t required;          /* 1: the user must give it */
    const char *default_value;  /* as a user would type it, or NULL for none */
    const char *help;           /* one line */
};

/* What the host hands the plugin at init. */
struct xen_disk_host {
    uint32_t size;              /* sizeof(struct xen_disk_host) as the host knows it */
    uint32_t api_version;       /* the API version the host speaks */
    /* Attaches a message to the error the calling thread's current callback returns.
       The text is copied; it should name the file or key at fault. Call it only on the
       way to returning an error: the host reads it when a callback fails, so a message
       left by a callback that then succeeded would be shown with a later failure. */
    void (*set_error)(const char *message);
};

/* Flags of pwrite. */
#define XEN_DISK_FUA 1u         /* durable when pwrite returns (only if can_fua) */

struct xen_disk_plugin {
    /* Must be first: sizeof(struct xen_disk_plugin), and XEN_DISK_API_VERSION. */
    uint32_t size;
    uint32_t api_version;

    const char *name;           /* what users type: --plugin NAME finds libNAME.so */
    const char *version;        /* the plugin's own version */
    const char *description;    /* one line */
    uint32_t thread_model;      /* enum xen_disk_thread_model */
    uint32_t sector_size;       /* logical sector size: 512 or 4096 (0 means 512) */
    uint32_t can_fua;           /* 1: pwrite honours XEN_DISK_FUA; else write + flush */
    uint32_t reserved;          /* 0 */
    const struct xen_disk_config_key *config_keys; /* NULL when it takes none */

    /* Configuration, once per disk before open: called for each key that has a value
       (given by the user or by its default), in the order of config_keys. *state starts as
       NULL; the plugin keeps whatever it likes there. Returns 0 or a negative errno. */
    int (*config)(void **state, const char *key, const char *value);
    /* Called instead of open when a config call failed, to free the state. May be NULL. */
    void (*config_free)(void *state);
    /* Opens a disk from the state config built (and owns it from then on). Returns the
       disk's handle, or NULL on failure (with set_error saying why). Required. */
    void *(*open)(void *state);
    /* Closes the disk: the handle is not used again. Required. */
    void (*close)(void *handle);
    /* The size in bytes (a multiple of sector_size), or a negative errno. Called at open and
       again when the host looks for a resize. Required. */
    int64_t (*get_size)(void *handle);
    /* Reads count bytes at offset into buf. Returns count, or a negative errno. Required. */
    int64_t (*pread)(void *handle, void *buf, uint32_t count, uint64_t offset);
    /* Writes count bytes at offset. Returns count, or a negative errno. NULL: read-only. */
    int64_t (*pwrite)(void *handle, const void *buf, uint32_t count, uint64_t offset,
                      uint32_t flags);
    /* Makes completed writes durable. NULL: no volatile cache (nothing to flush). */
    int (*flush)(void *handle);
    /* Discards count bytes at offset (later reads return zeroes or the old data). NULL: no
       discard is advertised to the guest. */
    int (*trim)(void *handle, uint64_t count, uint64_t offset);
    /* Makes count bytes at offset read as zeroes. NULL: the host writes zero buffers. */
    int (*zero)(void *handle, uint64_t count, uint64_t offset);

    /* ---- API 1.1 ---- (a 1.0 plugin's struct ends above; the host then uses 0 for these) */

    /* Discards are worth sending in units of discard_granularity bytes (0: the sector
       size), starting discard_alignment bytes into the disk (0: at its start). Advertised
       to the guest as discard-granularity and discard-alignment. */
    uint32_t discard_granularity;
    uint32_t discard_alignment;
};

/* The entry point every C plugin exports. Called once, when the host loads the library;
   the host struct stays valid for the life of the process, and so must the returned one. */
const struct xen_disk_plugin *xen_disk_plugin_init(const struct xen_disk_host *host);

#ifdef __cplusplus
}
#endif

#endif /* XEN_DISK_PLUGIN_H */
