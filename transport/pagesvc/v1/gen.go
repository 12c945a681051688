// Package pagesvc holds the wire contract of the cowmig page service
// (pages.proto) and the Go code generated from it. Do not edit the generated
// files; change pages.proto and run `go generate`.
package pagesvc

//go:generate sh ./generate.sh
