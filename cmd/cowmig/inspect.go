package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/live"
)

func imageFlag(name string, args []string) (string, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	dir := fs.String("image", "", "image directory")
	if err := fs.Parse(args); err != nil {
		return "", err
	}
	if *dir == "" {
		return "", errors.New("--image is required")
	}
	return *dir, nil
}

func runRelease(args []string) error {
	fs := flag.NewFlagSet("release", flag.ContinueOnError)
	dir := fs.String("image", "", "image directory")
	ca := fs.String("tls-ca", "", "CA of the page server's TLS certificate (PEM)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("--image is required")
	}
	tlsCfg, err := live.TLSFiles{CA: *ca}.Client()
	if err != nil {
		return err
	}
	return live.Release(context.Background(), *dir, tlsCfg)
}

func runInspect(args []string) error {
	dir, err := imageFlag("inspect", args)
	if err != nil {
		return err
	}
	img, err := image.Read(dir)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintf(w, "image %s: mode %s, snapshot %s, froze %.2f ms, %d pages (%d eager, %d lazy)\n",
		dir, img.Mode, img.SnapshotID, float64(img.Stats.FreezeNs)/1e6, img.Stats.PagesTotal, img.Stats.PagesEager, img.Stats.PagesLazy)
	if img.Stats.COW != "" {
		fmt.Fprintf(w, "copy-on-write: %s\n", img.Stats.COW)
	}
	if img.Endpoint != "" {
		fmt.Fprintf(w, "page server: %s\n", img.Endpoint)
	}
	for _, p := range img.Processes {
		fmt.Fprintf(w, "\nprocess %d (%s) exe %s cwd %s uid %d gid %d\n", p.Pid, p.Comm, p.Exe, p.Cwd, p.Creds.Uid[0], p.Creds.Gid[0])
		fmt.Fprintf(w, "threads:")
		for _, t := range p.Threads {
			fmt.Fprintf(w, " %d", t.Tid)
		}
		fmt.Fprintf(w, "\n\nSTART\tEND\tSIZE\tPROT\tKIND\tPAGES\tEAGER\tLAZY\tNAME\n")
		for _, v := range p.Vmas {
			var eager, lazy uint64
			for _, r := range v.Runs {
				if r.Where == image.InPages {
					eager += r.NPages
				} else {
					lazy += r.NPages
				}
			}
			name := v.Name
			if v.Path != "" {
				name = v.Path
			}
			fmt.Fprintf(w, "%#x\t%#x\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", v.Start, v.End, size(v.Len()), prot(v.Prot, v.Shared), v.Kind, eager+lazy, eager, lazy, name)
		}
		fmt.Fprintf(w, "\nFD\tKIND\tFLAGS\tWHAT\n")
		for _, f := range p.Fds {
			what := f.Path
			if f.Sock != nil {
				what = fmt.Sprintf("family %d type %d %s listening=%v connected=%v", f.Sock.Family, f.Sock.Type, f.Sock.AddrStr, f.Sock.Listening, f.Sock.Connected)
			}
			if f.Kind == image.FdPipe {
				what = fmt.Sprintf("pipe %d read=%v", f.PipeID, f.PipeRd)
			}
			fmt.Fprintf(w, "%d\t%s\t%#o\t%s\n", f.Num, f.Kind, f.Flags, what)
		}
	}
	return w.Flush()
}

func size(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fG", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fM", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%dK", n>>10)
}

func prot(p int, shared bool) string {
	b := []byte("---p")
	if p&1 != 0 {
		b[0] = 'r'
	}
	if p&2 != 0 {
		b[1] = 'w'
	}
	if p&4 != 0 {
		b[2] = 'x'
	}
	if shared {
		b[3] = 's'
	}
	return string(b)
}
