//! MC146818 real-time clock and CMOS NVRAM.
