// Sluice: the C side of the NFTables module's kernel interface. Headers only, no logic:
// libnftables (Debian libnftables-dev), the library the `nft` command is a thin wrapper
// over. Sluice hands it `nft -f` text and reads its buffered output and error text.
#include <stdint.h>
#include <stdbool.h>
#include <stdio.h>
#include <nftables/libnftables.h>
