// Sluice: the C side of the ipset client (Sources/IPVS/IPSet.swift). libipset (Debian
// libipset-dev): the session, its data and the set types.
//
// The one piece of C here: libipset prints listings through a printf-like callback, and
// Swift cannot define a C variadic function. `sluice_ipset_session_init` opens a session
// whose output is appended to a `sluice_ipset_output` buffer the Swift side owns and reads.
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libipset/nfproto.h>
#include <libipset/nf_inet_addr.h>
#include <libipset/linux_ip_set.h>
#include <libipset/data.h>
#include <libipset/session.h>
#include <libipset/types.h>

/// What a session printed: `count` bytes at `bytes` (not NUL-terminated), `capacity`
/// allocated (malloc; the owner frees it).
typedef struct sluice_ipset_output {
    char *bytes;
    size_t count;
    size_t capacity;
    int failed;
} sluice_ipset_output;

static inline int sluice_ipset_collect(struct ipset_session *session, void *p, const char *fmt, ...) {
    (void)session;
    sluice_ipset_output *out = (sluice_ipset_output *)p;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) { out->failed = 1; return n; }
    if (out->count + (size_t)n + 1 > out->capacity) {
        size_t want = out->capacity ? out->capacity : 65536;
        while (out->count + (size_t)n + 1 > want) want *= 2;
        char *grown = (char *)realloc(out->bytes, want);
        if (grown == NULL) { out->failed = 1; return -1; }
        out->bytes = grown;
        out->capacity = want;
    }
    va_start(ap, fmt);
    vsnprintf(out->bytes + out->count, (size_t)n + 1, fmt, ap);
    va_end(ap);
    out->count += (size_t)n;
    return n;
}

/// `ipset_session_init` with output collected into `out`.
static inline struct ipset_session *sluice_ipset_session_init(sluice_ipset_output *out) {
    return ipset_session_init(sluice_ipset_collect, out);
}
