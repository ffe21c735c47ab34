//! Declarative helpers that keep the data files short.

/// Declares a C enum as a `c_int` type alias plus one documented constant per value.
macro_rules! c_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $value:expr,)+ }) => {
        $(#[$meta])*
        pub type $name = $crate::c_int;
        $(
            #[doc = concat!("`", stringify!($name), "` value `", stringify!($variant), "`.")]
            pub const $variant: $name = $value;
        )+
    };
}

/// Compile-time size, alignment and field-offset assertions for a `#[repr(C)]` type.
macro_rules! assert_layout {
    ($ty:ty, size $size:expr, align $align:expr $(, { $($($field:ident).+ : $offset:expr),+ $(,)? })?) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
        const _: () = assert!(core::mem::align_of::<$ty>() == $align);
        $($(
            const _: () = assert!(core::mem::offset_of!($ty, $($field).+) == $offset);
        )+)?
    };
}

/// Implements `Default` as the all-zero value, which is what the C code starts from
/// (`memset`/`bzero`) and, for these types, means "no pointer, no flags, zero counts".
macro_rules! zeroed_default {
    ($($ty:ty),+ $(,)?) => {
        $(
            impl Default for $ty {
                fn default() -> Self {
                    // SAFETY: the type is `#[repr(C)]` and made only of integers, arrays of
                    // integers, raw pointers and unions of those, for all of which the all-zero
                    // bit pattern is a valid value (null for the pointers).
                    unsafe { core::mem::zeroed() }
                }
            }
        )+
    };
}

/// Getter and setter for one C bitfield held in an integer (or one element of an integer array)
/// field. `shift` counts from the least significant bit of that integer, as the SysV psABI
/// allocates bitfields on little-endian targets; the setter ignores bits of `value` beyond `width`.
macro_rules! bitfield {
    (
        $(#[$meta:meta])*
        $get:ident, $set:ident : $int:ty = $storage:ident $([$index:literal])?, shift $shift:literal, width $width:literal
    ) => {
        $(#[$meta])*
        #[inline]
        pub const fn $get(&self) -> $int {
            (self.$storage $([$index])? >> $shift) & (((1 as $int) << $width) - 1)
        }

        #[doc = concat!("Sets the bitfield read by `", stringify!($get), "()`.")]
        #[inline]
        pub fn $set(&mut self, value: $int) {
            let mask: $int = (((1 as $int) << $width) - 1) << $shift;
            let slot = &mut self.$storage $([$index])?;
            *slot = (*slot & !mask) | ((value << $shift) & mask);
        }
    };
}

/// `Debug` for a union: the active member depends on a tag outside it, so print no contents.
macro_rules! opaque_union_debug {
    ($($ty:ty),+ $(,)?) => {
        $(
            impl core::fmt::Debug for $ty {
                fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                    f.debug_struct(stringify!($ty)).finish_non_exhaustive()
                }
            }
        )+
    };
}
