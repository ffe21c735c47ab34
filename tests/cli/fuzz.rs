//! Property test: no command line makes the bhyve parser panic, every failure carries a FreeBSD
//! exit status, and the configuration tree always agrees with its flat view.

use bhyve::cli::{parse_bhyve_args, Invocation};

/// xorshift64*: deterministic, so a failure reproduces from its iteration number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const OPTIONS: &[&str] = &[
    "-s", "-l", "-o", "-c", "-m", "-p", "-G", "-n", "-k", "-K", "-U", "-f", "-r", "-H", "-A",
    "-AHPw", "-Hwl", "-S", "-u", "-w", "-x", "-Y", "-h", "-Q", "--", "-", "-M", "-e", "-C", "-D",
    "-I", "-W", "-a", "-s ", "-l ", "-p ", "-lcom1,", "-c", "---", "-:",
];

const PIECES: &[&str] = &[
    "0",
    "31",
    "32",
    "4:0",
    "0:5:0",
    "256:0:0",
    "7:8",
    " 29",
    "-1",
    "x",
    "",
    ",",
    ",,",
    "=",
    "==",
    "hostbridge",
    "amd_hostbridge",
    "lpc",
    "ahci",
    "ahci-hd",
    "ahci-cd",
    "nvme",
    "virtio-blk",
    "virtio-net",
    "virtio-rnd",
    "virtio-console",
    "virtio-scsi",
    "virtio-9p",
    "virtio-input",
    "e1000",
    "fbuf",
    "xhci",
    "hda",
    "passthru",
    "uart",
    "bogus",
    "hd:",
    "cd:",
    "/d.img",
    "tap0",
    "mac=52:54:00:00:00:01",
    "ram=8",
    "ppt0",
    "3/0/0",
    "pci0:1:2:3",
    "tablet",
    "a=/s",
    "com1",
    "COM2",
    "bootrom",
    "tpm",
    "swtpm",
    "pc-testdev",
    "help",
    "he",
    "stdio",
    "tcp=1.2.3.4:5",
    "fwcfg=qemu",
    "cpus=",
    "sockets=2",
    "cores=0",
    "threads=70000",
    "65536",
    "0x10",
    "1G",
    "512MB",
    "12Q",
    "99999999999999999999",
    "name",
    "config.dump",
    "true",
    "1",
    "memory.size",
    "pci.0.4.0",
    "a..b",
    ".",
    "%(name)",
    "\\",
    "id=0",
    "size=1G",
    "w",
    "w:",
    ":1234",
    "0:1",
    "0:1024",
    "é",
    "\u{0}",
    "\n",
    " ",
    "string=x",
    "file=/x",
    "opt/x",
];

fn word(rng: &mut Rng) -> String {
    let parts = 1 + rng.below(4);
    let mut s = String::new();
    for i in 0..parts {
        if i > 0 {
            s.push_str(rng.pick(&[",", ":", "=", "", ".", " "]));
        }
        s.push_str(rng.pick(PIECES));
    }
    s
}

fn argv(rng: &mut Rng) -> Vec<String> {
    let mut args = vec!["bhyve".to_string()];
    for _ in 0..rng.below(12) {
        match rng.below(3) {
            0 => args.push(rng.pick(OPTIONS).to_string()),
            1 => {
                let mut glued = rng.pick(OPTIONS).to_string();
                glued.push_str(&word(rng));
                args.push(glued);
            }
            _ => args.push(word(rng)),
        }
    }
    args
}

#[test]
fn random_command_lines_never_panic_and_fail_cleanly() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut outcomes = [0usize; 3];
    for iteration in 0..20_000 {
        let args = argv(&mut rng);
        let result = std::panic::catch_unwind(|| parse_bhyve_args(&args));
        let Ok(result) = result else {
            panic!("iteration {iteration}: parser panicked on {args:?}");
        };
        match result {
            Ok(Invocation::Run { config, .. }) => {
                outcomes[0] += 1;
                let flat: usize = config.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
                assert_eq!(
                    config.dump().len(),
                    flat,
                    "tree and flat view differ for {args:?}"
                );
            }
            Ok(Invocation::Exit { status, .. }) => {
                outcomes[1] += 1;
                assert!([0, 1].contains(&status), "{args:?}: exit {status}");
            }
            Err(e) => {
                outcomes[2] += 1;
                assert!(
                    [1, 4, 64].contains(&e.status),
                    "{args:?}: status {}",
                    e.status
                );
            }
        }
    }
    // The alphabet reaches every outcome, so the test exercises more than the error paths.
    assert!(outcomes.iter().all(|&n| n > 100), "outcomes {outcomes:?}");
}
