use super::*;

fn node_config(pairs: &[(&str, &str)]) -> Config {
    let mut config = Config::new();
    for (key, value) in pairs {
        config.set(&format!("pci.0.2.0.{key}"), value);
    }
    config
}

fn spec(pairs: &[(&str, &str)]) -> Result<Option<BackendSpec>, NetError> {
    BackendSpec::from_config(&node_config(pairs), "pci.0.2.0")
}

/// net_genmac as read in net_utils.c: snprintf("%d-%d-%s", slot, func, vmname), MD5, the OUI
/// and the digest's first three bytes. The digest here comes from md5sum(1), not the md5 crate.
#[test]
fn generated_mac_matches_bhyve_formula_with_md5sum_as_oracle() {
    let cases = [
        ("guest", 2u8, 0u8),
        ("vm1", 3, 1),
        ("a-much-longer-vm-name", 31, 7),
    ];
    for (name, slot, function) in cases {
        let input = format!("{slot}-{function}-{name}");
        let output = match std::process::Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            Ok(mut child) => {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                child.wait_with_output().unwrap()
            }
            Err(e) => {
                eprintln!("skipped: md5sum unavailable ({e})");
                return;
            }
        };
        let hex = String::from_utf8(output.stdout).unwrap();
        let expected = format!("58:9c:fc:{}:{}:{}", &hex[0..2], &hex[2..4], &hex[4..6]);
        assert_eq!(
            format_mac(&generate_mac(name, slot, function)),
            expected,
            "{input}"
        );
    }
}

/// md5("2-0-guest") = 11f825bd… (md5sum(1), recorded), so the test holds where md5sum is
/// missing: bhyve names a VM "guest" with a NIC in slot 2 58:9c:fc:11:f8:25.
#[test]
fn generated_mac_fixed_value() {
    assert_eq!(
        generate_mac("guest", 2, 0),
        [0x58, 0x9c, 0xfc, 0x11, 0xf8, 0x25]
    );
    // The bus is not part of the string, the slot and function are.
    assert_ne!(generate_mac("guest", 2, 0), generate_mac("guest", 2, 1));
    assert_ne!(generate_mac("guest", 2, 0), generate_mac("guest", 3, 0));
    assert_ne!(generate_mac("guest", 2, 0), generate_mac("guest2", 2, 0));
}

#[test]
fn mac_parsing_follows_ether_aton_and_refuses_multicast_and_zero() {
    assert_eq!(
        parse_mac("58:9c:fc:01:02:03"),
        Some([0x58, 0x9c, 0xfc, 1, 2, 3])
    );
    assert_eq!(parse_mac("0:a0:98:1:2:3"), Some([0, 0xa0, 0x98, 1, 2, 3]));
    assert_eq!(
        parse_mac("00:A0:98:AB:CD:EF"),
        Some([0, 0xa0, 0x98, 0xab, 0xcd, 0xef])
    );
    for bad in [
        "",
        "01:00:5e:00:00:01", // multicast
        "ff:ff:ff:ff:ff:ff", // broadcast
        "00:00:00:00:00:00",
        "00:a0:98:01:02",
        "00:a0:98:01:02:03:04",
        "00:a0:98:01:02:xx",
        "00:a0:98:01:02:123",
        "00-a0-98-01-02-03",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad}");
    }
}

#[test]
fn mtu_parsing_is_strtoul_base_zero_without_sign() {
    assert_eq!(parse_mtu("1500"), Some(1500));
    assert_eq!(parse_mtu("0x2328"), Some(9000));
    assert_eq!(parse_mtu("-1"), None);
    assert_eq!(parse_mtu("1500k"), None);
    assert_eq!(parse_mtu(""), None);
}

#[test]
fn backends_are_chosen_by_prefix_of_type_or_backend_as_bhyve() {
    assert_eq!(spec(&[]).unwrap(), None);
    assert_eq!(
        spec(&[("backend", "tap0")]).unwrap(),
        Some(BackendSpec::Tap {
            name: "tap0".into()
        })
    );
    assert_eq!(
        spec(&[("backend", "vmnet3")]).unwrap(),
        Some(BackendSpec::Tap {
            name: "vmnet3".into()
        })
    );
    // type= picks the backend, backend= stays the interface name.
    assert_eq!(
        spec(&[("backend", "lan0"), ("type", "tap")]).unwrap(),
        Some(BackendSpec::Tap {
            name: "lan0".into()
        })
    );
    assert_eq!(
        spec(&[("backend", "slirp")]).unwrap(),
        Some(BackendSpec::Slirp {
            hostfwd: vec![],
            open: false
        })
    );
    assert_eq!(
        spec(&[("backend", "slirp"), ("open", "true")]).unwrap(),
        Some(BackendSpec::Slirp {
            hostfwd: vec![],
            open: true
        })
    );
    assert_eq!(
        spec(&[("backend", "slirp"), ("open", "maybe")])
            .unwrap_err()
            .to_string(),
        "invalid value \"maybe\" for pci.0.2.0.open (expected true or false)"
    );
    assert!(matches!(
        spec(&[("backend", "eth0")]),
        Err(NetError::Unknown(name)) if name == "eth0"
    ));
}

#[test]
fn freebsd_kernel_backends_are_refused_by_name() {
    for (backend, facility) in [
        ("netgraph", "netgraph(4)"),
        ("netmap:em0", "netmap(4)"),
        ("vale0:1", "netmap(4)"),
    ] {
        let error = spec(&[("backend", backend)]).unwrap_err();
        let message = error.to_string();
        assert!(message.contains(backend), "{message}");
        assert!(message.contains(facility), "{message}");
    }
    let error = spec(&[("backend", "ng0"), ("type", "netgraph")]).unwrap_err();
    assert!(error.to_string().contains("\"ng0\""), "{error}");
}

#[test]
fn hostfwd_rules_parse_as_net_backend_slirp() {
    let Some(BackendSpec::Slirp { hostfwd, .. }) = spec(&[
        ("backend", "slirp"),
        ("hostfwd", "tcp::2222-:22;udp:127.0.0.1:5353-10.0.2.15:53"),
    ])
    .unwrap() else {
        panic!("not slirp");
    };
    assert_eq!(
        hostfwd,
        vec![
            HostForward {
                udp: false,
                host: "0.0.0.0:2222".parse().unwrap(),
                guest: "0.0.0.0:22".parse().unwrap(),
            },
            HostForward {
                udp: true,
                host: "127.0.0.1:5353".parse().unwrap(),
                guest: "10.0.2.15:53".parse().unwrap(),
            },
        ]
    );
    for bad in [
        "tcp",
        "tcp:2222-:22",
        "tcp::2222",
        "tcp::99999-:22",
        "tcp:1.2.3:1-:2",
    ] {
        assert!(HostForward::parse(bad).is_err(), "{bad}");
    }
}
