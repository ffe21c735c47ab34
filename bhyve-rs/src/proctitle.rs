//! The process title FreeBSD management tools look for: `ps` shows a running VM as
//! `bhyve: NAME`, as bhyve's `setproctitle("%s", vmname)` makes it appear.

/// Make `ps -o args=` show `title` for this process. Failure only costs the title, so it is
/// logged, not returned.
pub fn set(title: &str) {
    let Ok(title) = std::ffi::CString::new(title) else {
        return;
    };
    if let Err(e) = set_title(title) {
        log::info!("cannot set the process title: {e}");
    }
}

#[cfg(target_os = "freebsd")]
fn set_title(title: std::ffi::CString) -> std::io::Result<()> {
    // setproctitle prefixes the program name itself ("bhyve: NAME"), so only the part after
    // the prefix is passed on.
    let bytes = title.as_bytes();
    let name = bytes.strip_prefix(b"bhyve: ").unwrap_or(bytes);
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: both arguments are valid NUL-terminated strings and "%s" consumes exactly one.
    unsafe { libc::setproctitle(c"%s".as_ptr(), name.as_ptr()) };
    Ok(())
}

#[cfg(target_os = "linux")]
fn set_title(title: std::ffi::CString) -> std::io::Result<()> {
    // /proc/PID/cmdline (what ps shows) is read from the memory that held argv at exec, whose
    // bounds are fields 48 and 49 of /proc/self/stat. Moving those bounds needs
    // CAP_SYS_RESOURCE, so overwrite the memory in place, as setproctitle does: the title,
    // then zeros to the end. The title is cut to fit; std::env::args() reads the new text
    // afterwards, which is why this runs only once the command line has been parsed.
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may contain blanks.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("unexpected /proc/self/stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field 3 (state) is the first after the name, so field N is at index N - 3.
    let field = |n: usize| -> std::io::Result<usize> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other("no argument range in /proc/self/stat"))
    };
    let (start, end) = (field(48)?, field(49)?);
    if start == 0 || end <= start {
        return Err(std::io::Error::other("empty argument range"));
    }
    let room = end - start;
    let title = title.as_bytes();
    let len = title.len().min(room - 1);
    // SAFETY: [start, end) is this process's own argv area as the kernel reports it: mapped,
    // writable stack memory that nothing else uses once the command line has been parsed.
    let area = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, room) };
    area[..len].copy_from_slice(&title[..len]);
    area[len..].fill(0);
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
fn set_title(_title: std::ffi::CString) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}
