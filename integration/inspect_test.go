package integration

import (
	"sort"
	"strconv"
	"strings"
)

// inspectVma is one mapping row of `cowmig inspect`.
type inspectVma struct {
	start, end         uint64
	kind               string
	pages, eager, lazy uint64
	name               string
}

// inspection is what the tests read from `cowmig inspect`.
type inspection struct {
	header  string
	threads []int
	vmas    []inspectVma
}

func (h *harness) inspect(dir string) inspection {
	h.t.Helper()
	r := h.mustRun(runOpts{}, "inspect", "--image", dir)
	var in inspection
	for _, l := range strings.Split(r.stdout, "\n") {
		f := strings.Fields(l)
		switch {
		case strings.HasPrefix(l, "image "):
			in.header = l
		case strings.HasPrefix(l, "threads:"):
			for _, s := range f[1:] {
				n, err := strconv.Atoi(s)
				if err != nil {
					h.t.Fatalf("inspect: thread %q in %q", s, l)
				}
				in.threads = append(in.threads, n)
			}
		case len(f) >= 8 && strings.HasPrefix(f[0], "0x"):
			var v inspectVma
			var err error
			parse := func(s string, base int) uint64 {
				n, e := strconv.ParseUint(strings.TrimPrefix(s, "0x"), base, 64)
				if e != nil && err == nil {
					err = e
				}
				return n
			}
			v.start, v.end = parse(f[0], 16), parse(f[1], 16)
			v.kind = f[4]
			v.pages, v.eager, v.lazy = parse(f[5], 10), parse(f[6], 10), parse(f[7], 10)
			if len(f) > 8 {
				v.name = f[8]
			}
			if err != nil {
				h.t.Fatalf("inspect: mapping row %q: %v", l, err)
			}
			in.vmas = append(in.vmas, v)
		}
	}
	if in.header == "" || len(in.threads) == 0 || len(in.vmas) == 0 {
		h.t.Fatalf("inspect output lacks header, threads or mappings:\n%s", r.stdout)
	}
	sort.Ints(in.threads)
	return in
}
