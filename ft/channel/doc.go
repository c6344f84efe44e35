// Package channel is the FT pair's logging channel: one TCP connection
// between a primary and its backup.
//
// Before any guest data flows, both ends prove that they hold the same
// shared key (HMAC-SHA256 over both ends' random nonces, so neither a
// replayed nor a reflected proof passes), then exchange compatibility
// records and refuse each other, with a message the other end prints, when
// they cannot replicate the same guest. After the handshake the connection
// carries framed messages: the replay log from primary to backup,
// acknowledgements back (how much log the backup has received, and how
// much its replay has consumed), heartbeats both ways, a goodbye, and
// control messages of the roles above. Any frame counts as a sign of life;
// an end that hears nothing from its peer for the timeout declares it lost.
//
// The primary writes the log through LogWriter, which blocks (slowing the
// guest) while too much log is unacknowledged or while the backup's replay
// lags too far behind in time. The backup reads it through LogReader, which
// never blocks: at the end of what has arrived it returns io.EOF, as a
// growing file does, and signals Arrived when more comes.
package channel
