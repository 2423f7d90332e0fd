// Sluice: a per-node Kubernetes service proxy.
// Header-only view of the Linux UAPI headers the netlink code needs. No code lives here:
// the Swift side uses `sockaddr_nl` and the socket constants, and the tests compare every
// Swift-side protocol constant with the C one it mirrors.
#ifndef SLUICE_CNETLINK_SHIM_H
#define SLUICE_CNETLINK_SHIM_H

#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/genetlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/if_addr.h>
#include <linux/ip_vs.h>

#endif
