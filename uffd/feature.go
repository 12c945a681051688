package uffd

import (
	"fmt"
	"math/bits"
	"strings"
)

// PageSize is the base page size on x86_64; every address and length handed
// to the kernel must be a multiple of it.
const PageSize = 4096

// Feature is a set of UFFD_FEATURE_* bits (uffdio_api.features). The values
// are the kernel's ABI and are pinned here.
type Feature uint64

// UFFD_FEATURE_* from include/uapi/linux/userfaultfd.h.
const (
	FeaturePagefaultFlagWP  Feature = 1 << 0
	FeatureEventFork        Feature = 1 << 1
	FeatureEventRemap       Feature = 1 << 2
	FeatureEventRemove      Feature = 1 << 3
	FeatureMissingHugetlbfs Feature = 1 << 4
	FeatureMissingShmem     Feature = 1 << 5
	FeatureEventUnmap       Feature = 1 << 6
	FeatureSigbus           Feature = 1 << 7
	FeatureThreadID         Feature = 1 << 8
	FeatureMinorHugetlbfs   Feature = 1 << 9
	FeatureMinorShmem       Feature = 1 << 10
	FeatureExactAddress     Feature = 1 << 11
	FeatureWPHugetlbfsShmem Feature = 1 << 12
	FeatureWPUnpopulated    Feature = 1 << 13
	FeaturePoison           Feature = 1 << 14
	FeatureWPAsync          Feature = 1 << 15
	FeatureMove             Feature = 1 << 16
)

// LazyFeatures are the features a uffd served by Lazy should be created
// with: without them the kernel silently drops the registration of memory
// the process moves or unmaps (mm/userfaultfd.c:mremap_userfaultfd_prep),
// and pages it discards with MADV_DONTNEED would be refilled with stale
// content.
const LazyFeatures = FeatureEventRemove | FeatureEventUnmap | FeatureEventRemap

var featureNames = [...]string{
	"PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE",
	"MISSING_HUGETLBFS", "MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS",
	"THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM", "EXACT_ADDRESS",
	"WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
}

// String lists the names of the set bits, e.g. "EVENT_REMOVE|MOVE".
func (f Feature) String() string {
	if f == 0 {
		return "0"
	}
	var names []string
	for rest := uint64(f); rest != 0; rest &= rest - 1 {
		i := bits.TrailingZeros64(rest)
		if i < len(featureNames) {
			names = append(names, featureNames[i])
		} else {
			names = append(names, fmt.Sprintf("1<<%d", i))
		}
	}
	return strings.Join(names, "|")
}

// Mode is a set of UFFDIO_REGISTER_MODE_* bits.
type Mode uint64

// UFFDIO_REGISTER_MODE_* from include/uapi/linux/userfaultfd.h.
const (
	ModeMissing Mode = 1 << 0
	ModeWP      Mode = 1 << 1
	ModeMinor   Mode = 1 << 2
)

// CopyMode is a set of UFFDIO_COPY_MODE_* bits.
type CopyMode uint64

// UFFDIO_COPY_MODE_* from include/uapi/linux/userfaultfd.h.
const (
	CopyDontWake CopyMode = 1 << 0
	// CopyWP maps the copied pages write-protected (range registered with ModeWP).
	CopyWP CopyMode = 1 << 1
)

// MoveMode is a set of UFFDIO_MOVE_MODE_* bits.
type MoveMode uint64

// UFFDIO_MOVE_MODE_* from include/uapi/linux/userfaultfd.h.
const (
	MoveDontWake MoveMode = 1 << 0
	// MoveAllowSrcHoles counts unpopulated source pages as moved instead of
	// failing with ENOENT.
	MoveAllowSrcHoles MoveMode = 1 << 1
)

// ContinueMode is a set of UFFDIO_CONTINUE_MODE_* bits.
type ContinueMode uint64

// UFFDIO_CONTINUE_MODE_* from include/uapi/linux/userfaultfd.h.
const (
	ContinueDontWake ContinueMode = 1 << 0
	ContinueWP       ContinueMode = 1 << 1
)

// Bits of the ioctls mask returned by Register (1 << _UFFDIO_*).
const (
	IoctlRegister     uint64 = 1 << 0x00
	IoctlUnregister   uint64 = 1 << 0x01
	IoctlWake         uint64 = 1 << 0x02
	IoctlCopy         uint64 = 1 << 0x03
	IoctlZeroPage     uint64 = 1 << 0x04
	IoctlMove         uint64 = 1 << 0x05
	IoctlWriteProtect uint64 = 1 << 0x06
	IoctlContinue     uint64 = 1 << 0x07
	IoctlPoison       uint64 = 1 << 0x08
	IoctlAPI          uint64 = 1 << 0x3f
)

// UserModeOnly is the UFFD_USER_MODE_ONLY flag of userfaultfd(2): the uffd
// handles faults raised in user mode only; faults the kernel takes while
// copying to or from user memory get EFAULT instead.
const UserModeOnly = 1
