package uffd

// Helpers for a write-protect (copy-on-write snapshot) engine. The engine
// decides what to save before it lets a write through; the Loop only
// delivers the fault.

// Unprotect clears write protection on [start, start+length) and wakes the
// threads blocked writing there. A COW handler calls it once it has saved
// the original content of the range.
func (u *FD) Unprotect(start, length uint64) error {
	return u.WriteProtect(start, length, false, false)
}

// Protect write-protects [start, start+length) (registered with ModeWP).
func (u *FD) Protect(start, length uint64) error {
	return u.WriteProtect(start, length, true, false)
}
