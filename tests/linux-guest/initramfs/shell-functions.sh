# Read by the guest's interactive shell ($ENV). Every character typed on the console costs an
# interrupt handled in emulated guest kernel code, so the tests type short commands:
# `x 'COMMAND'` runs COMMAND between two marker lines the shell computes ("x-begin-42",
# "x-end-42"), which the terminal's echo of the typed line never contains.
x() {
    echo "x-begin-$((6 * 7))"
    eval "$1"
    echo "x-end-$((6 * 7))"
}
