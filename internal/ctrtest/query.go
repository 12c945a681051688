package ctrtest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A socket belongs to the network namespace of the thread that creates it.
// Go creates a dialed socket on the goroutine that dials, so a goroutine
// locked to an OS thread that setns'd into a namespace dials from there.
// Such a goroutine never unlocks its thread: the runtime then ends the
// thread with the goroutine instead of reusing it in the wrong namespace.

// enterNetns locks the calling goroutine to its thread and moves the
// thread into network namespace ns ("" = stay). Call it only from a
// goroutine that exits when done with the namespace.
func enterNetns(ns string) error {
	runtime.LockOSThread()
	if ns == "" {
		return nil
	}
	f, err := os.Open("/run/netns/" + ns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", ns, err)
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("enter netns %s: %w", ns, err)
	}
	return nil
}

// inNetns runs f on a fresh thread inside network namespace ns.
func inNetns(ns string, f func() error) error {
	done := make(chan error, 1)
	go func() {
		if err := enterNetns(ns); err != nil {
			done <- err
			return
		}
		done <- f()
	}()
	return <-done
}

// Query connects to the kvserver at addr (host:port) from network
// namespace ns (a name under /run/netns; "" = the caller's), sends cmd and
// a newline, and returns the answer line without its newline. timeout
// bounds the whole exchange.
func Query(ns, addr, cmd string, timeout time.Duration) (string, error) {
	var line string
	err := inNetns(ns, func() error {
		var err error
		line, err = exchange(addr, cmd, timeout)
		return err
	})
	return line, err
}

// exchange does one request on the calling goroutine's thread.
func exchange(addr, cmd string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", fmt.Errorf("connect %s: %w", addr, err)
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return "", fmt.Errorf("set deadline %s: %w", addr, err)
	}
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", fmt.Errorf("send %q to %s: %w", cmd, addr, err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && line != "") {
		if errors.Is(err, io.EOF) {
			err = ErrNoAnswer
		}
		return "", fmt.Errorf("read answer to %q from %s: %w", cmd, addr, err)
	}
	return strings.TrimRight(line, "\r\n"), nil
}

// WaitReady sends GET to the kvserver at addr from network namespace ns
// until it answers "count ...", and returns that answer. It retries while
// the connection fails (the container is starting: nothing listens yet)
// for up to timeout.
func WaitReady(ns, addr string, timeout time.Duration) (string, error) {
	var line string
	err := inNetns(ns, func() error {
		deadline := time.Now().Add(timeout)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			l, err := exchange(addr, "GET", time.Second)
			if err == nil && strings.HasPrefix(l, "count ") {
				line = l
				return nil
			}
			if err == nil {
				err = fmt.Errorf("GET %s answered %q", addr, l)
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("kvserver at %s not ready after %v: %w", addr, timeout, err)
			}
			<-tick.C // polling: a server in another netns offers nothing to wait on
		}
	})
	return line, err
}

// ProbeResult summarises a probe: how long the kvserver went without a
// successful GET, which is the downtime a client sees.
type ProbeResult struct {
	Sent, OK, Failed int
	// MaxGap is the longest time without a successful answer: between
	// two successes, from the probe's start to the first, or from the
	// last to Stop. GapStart is when it began.
	MaxGap   time.Duration
	GapStart time.Time
	// MaxLatency is the slowest successful request.
	MaxLatency time.Duration
	// FirstErr is the first failure, Last the last answer.
	FirstErr error
	Last     string
	Start    time.Time
	Duration time.Duration
}

func (r ProbeResult) String() string {
	return fmt.Sprintf("sent=%d ok=%d failed=%d maxgap=%v maxlatency=%v over %v (first error: %v)",
		r.Sent, r.OK, r.Failed, r.MaxGap, r.MaxLatency, r.Duration, r.FirstErr)
}

// Prober sends GET to a kvserver every interval from a network namespace
// until Stop.
type Prober struct {
	stop chan struct{}
	done chan struct{}
	res  ProbeResult // written by the probe goroutine before done closes
}

// StartProbe starts probing the kvserver at addr from network namespace ns
// ("" = the caller's): one GET every interval (back to back while a
// request takes longer), each bounded by timeout. A success is an answer
// starting with "count ". Call Stop to end it and get the result.
func StartProbe(ns, addr string, interval, timeout time.Duration) (*Prober, error) {
	p := &Prober{stop: make(chan struct{}), done: make(chan struct{})}
	entered := make(chan error, 1)
	go func() {
		defer close(p.done)
		if err := enterNetns(ns); err != nil {
			entered <- err
			return
		}
		entered <- nil
		p.loop(addr, interval, timeout)
	}()
	if err := <-entered; err != nil {
		<-p.done
		return nil, err
	}
	return p, nil
}

// Stop ends the probe, waits for its goroutine and returns the result.
// It must be called exactly once.
func (p *Prober) Stop() ProbeResult {
	close(p.stop)
	<-p.done
	return p.res
}

// Probe probes for duration d; see StartProbe.
func Probe(ns, addr string, interval, timeout, d time.Duration) (ProbeResult, error) {
	p, err := StartProbe(ns, addr, interval, timeout)
	if err != nil {
		return ProbeResult{}, err
	}
	t := time.NewTimer(d)
	<-t.C
	return p.Stop(), nil
}

func (p *Prober) loop(addr string, interval, timeout time.Duration) {
	r := &p.res
	r.Start = time.Now()
	lastOK := r.Start
	gap := func(now time.Time) {
		if g := now.Sub(lastOK); g > r.MaxGap {
			r.MaxGap, r.GapStart = g, lastOK
		}
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	next := r.Start
	for {
		select {
		case <-p.stop:
			now := time.Now()
			gap(now)
			r.Duration = now.Sub(r.Start)
			return
		case <-timer.C:
		}
		sent := time.Now()
		r.Sent++
		line, err := exchange(addr, "GET", timeout)
		now := time.Now()
		if err == nil && !strings.HasPrefix(line, "count ") {
			err = fmt.Errorf("GET %s answered %q", addr, line)
		}
		if err != nil {
			r.Failed++
			if r.FirstErr == nil {
				r.FirstErr = err
			}
		} else {
			r.OK++
			r.Last = line
			r.MaxLatency = max(r.MaxLatency, now.Sub(sent))
			gap(now)
			lastOK = now
		}
		next = next.Add(interval)
		if next.Before(now) {
			next = now
		}
		timer.Reset(next.Sub(now))
	}
}
