// Sluice: the C side of the Conntrack module. Headers only, no logic: libnetfilter_conntrack
// (Debian libnetfilter-conntrack-dev) and the libnfnetlink it is built on, whose handle runs
// the dump loop the Swift wrapper uses.
#include <stdint.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <libnfnetlink/libnfnetlink.h>
#include <libnetfilter_conntrack/libnetfilter_conntrack.h>
