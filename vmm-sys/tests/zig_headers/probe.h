/*
 * Fixed part of the ABI probe that tests/zig_headers.rs generates and compiles with
 * `zig cc -target x86_64-freebsd -c`: FreeBSD's own headers as the zig wheel ships them, and the
 * record layout the test reads back from the object file. The generated part defines
 * `union probe_bits` and one record per checked item in the section PROBE_SECTION; nothing is
 * computed at run time, so every value is a constant the compiler wrote into the object.
 */
#include <sys/types.h>
#include <sys/param.h>
#include <sys/ioccom.h>
#include <sys/cpuset.h>
#include <sys/domainset.h>
#include <sys/time.h>
#include <stddef.h>
#include <stdint.h>

/* vmm_dev.h expects vmm.h and vmm_snapshot.h first, as bhyve's own sources include them. */
#include <machine/vmm.h>
#include <machine/vmm_snapshot.h>
#include <machine/vmm_dev.h>

#define PROBE_SECTION ".bhyve_rs_abi_probe"
/* First record: this magic number as index, the record size as value. */
#define PROBE_MAGIC 0x6268797665727301ull
