/*
 * report: one line saying what this Linux guest sees of its machine, for the tests to compare
 * between VMMs:
 *   linux-report kernel=R cpus=N topology=CPU:PACKAGE/CORE,... mem_kb=N acpi=SIG,...
 *                pci=BDF=VENDOR:DEVICE:CLASS,... clocksource=NAME rtc=SECONDS clock=SECONDS
 *                console=NAME uart=PORT/IRQ
 * Lists are sorted; a value that cannot be read is "-". Written in C rather than shell so that
 * it starts one process instead of dozens.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>

static char line[16384];

static void add(const char *text) { strncat(line, text, sizeof(line) - strlen(line) - 1); }

/* The first line of a file, without its newline, or "-". */
static const char *first_line(const char *path, char *buf, size_t size) {
    FILE *f = fopen(path, "r");
    if (!f || !fgets(buf, (int)size, f)) {
        if (f)
            fclose(f);
        return "-";
    }
    fclose(f);
    buf[strcspn(buf, "\n")] = 0;
    return buf;
}

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

static int visible(const struct dirent *d) { return d->d_name[0] != '.'; }

static void acpi_tables(void) {
    struct dirent **names;
    int n = scandir("/sys/firmware/acpi/tables", &names, visible, by_name);
    add(" acpi=");
    if (n <= 0) {
        add("-");
        return;
    }
    int first = 1;
    for (int i = 0; i < n; i++) {
        char path[512];
        struct stat st;
        snprintf(path, sizeof(path), "/sys/firmware/acpi/tables/%s", names[i]->d_name);
        /* The directories (data, dynamic) hold tables loaded later, not the firmware's. */
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            add(first ? "" : ",");
            add(names[i]->d_name);
            first = 0;
        }
        free(names[i]);
    }
    free(names);
}

static void pci_functions(void) {
    struct dirent **names;
    int n = scandir("/sys/bus/pci/devices", &names, visible, by_name);
    add(" pci=");
    if (n <= 0) {
        add("-");
        return;
    }
    for (int i = 0; i < n; i++) {
        char path[512], vendor[64], device[64], class[64], item[1024];
        const char *bdf = names[i]->d_name;
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", bdf);
        const char *v = first_line(path, vendor, sizeof(vendor));
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", bdf);
        const char *d = first_line(path, device, sizeof(device));
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/class", bdf);
        const char *c = first_line(path, class, sizeof(class));
        /* sysfs says 0x8086; the report says 8086. */
        snprintf(item, sizeof(item), "%s%s=%s:%s:%s", i ? "," : "", bdf,
                 strncmp(v, "0x", 2) ? v : v + 2, strncmp(d, "0x", 2) ? d : d + 2,
                 strncmp(c, "0x", 2) ? c : c + 2);
        add(item);
        free(names[i]);
    }
    free(names);
}

static void cpus(void) {
    char path[256], package[64], core[64], item[256], count[32];
    int n = 0;
    char topology[4096] = "";
    for (int cpu = 0; cpu < 1024; cpu++) {
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
        const char *c = first_line(path, core, sizeof(core));
        if (!strcmp(c, "-"))
            break;
        snprintf(path, sizeof(path),
                 "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", cpu);
        const char *p = first_line(path, package, sizeof(package));
        snprintf(item, sizeof(item), "%s%d:%s/%s", n ? "," : "", cpu, p, c);
        strncat(topology, item, sizeof(topology) - strlen(topology) - 1);
        n++;
    }
    snprintf(count, sizeof(count), " cpus=%d", n);
    add(count);
    add(" topology=");
    add(n ? topology : "-");
}

static void memory(void) {
    char buf[256];
    long kb = -1;
    FILE *f = fopen("/proc/meminfo", "r");
    while (f && fgets(buf, sizeof(buf), f))
        if (sscanf(buf, "MemTotal: %ld kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    snprintf(buf, sizeof(buf), " mem_kb=%ld", kb);
    add(buf);
}

int main(void) {
    char buf[256], port[64], irq[64];
    struct utsname u;
    strcpy(line, "linux-report");
    add(" kernel=");
    add(uname(&u) == 0 ? u.release : "-");
    cpus();
    memory();
    acpi_tables();
    pci_functions();
    add(" clocksource=");
    add(first_line("/sys/devices/system/clocksource/clocksource0/current_clocksource", buf,
                   sizeof(buf)));
    add(" rtc=");
    add(first_line("/sys/class/rtc/rtc0/since_epoch", buf, sizeof(buf)));
    snprintf(buf, sizeof(buf), " clock=%ld", (long)time(NULL));
    add(buf);
    /* The first console the kernel writes to, as /proc/consoles names it. */
    const char *console = first_line("/proc/consoles", buf, sizeof(buf));
    add(" console=");
    add(strcmp(console, "-") ? strtok(buf, " ") : "-");
    add(" uart=");
    add(first_line("/sys/class/tty/ttyS0/port", port, sizeof(port)));
    add("/");
    add(first_line("/sys/class/tty/ttyS0/irq", irq, sizeof(irq)));
    puts(line);
    return 0;
}
