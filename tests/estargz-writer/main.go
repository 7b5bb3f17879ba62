// Command estargz-writer converts a tar file into an eStargz blob with the estargz
// package of containerd's stargz-snapshotter, the reference writer of the format. The
// tests build it offline with Debian's Go and Debian's packaged Go sources (see
// scripts/newer-debian) and compare zest's reading of its output with the tar.
//
// Usage: estargz-writer IN.tar OUT.blob CHUNK-SIZE
// Prints one JSON line: the TOC digest (the value of the
// containerd.io/snapshot/stargz/toc.digest annotation) and the diff ID.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "estargz-writer:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("usage: estargz-writer IN.tar OUT.blob CHUNK-SIZE")
	}
	chunkSize, err := strconv.Atoi(args[2])
	if err != nil || chunkSize <= 0 {
		return fmt.Errorf("chunk size %q: not a positive number", args[2])
	}
	in, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer in.Close()
	info, err := in.Stat()
	if err != nil {
		return err
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, info.Size()), estargz.WithChunkSize(chunkSize))
	if err != nil {
		return err
	}
	defer blob.Close()
	out, err := os.Create(args[1])
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, blob); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]string{
		"tocDigest": blob.TOCDigest().String(),
		"diffID":    blob.DiffID().String(),
	})
}
