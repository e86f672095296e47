// pccl_py._native: a thin binding of the C++ engine. Buffers are taken zero-copy
// through the buffer protocol and held until the op finishes; the GIL is released
// around every blocking call. Native errors become the classes of pccl_py.errors.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "pccl/engine.hpp"
#include "pccl/hmac.hpp"
#include "pccl/prefault.hpp"
#include "pccl/wan_relay.hpp"
#ifdef PCCL_WITH_CUDA
#include "pccl/cuda_quantize.hpp"
#endif

namespace py = pybind11;
using namespace pccl;

namespace {

// A Py_buffer held for the life of an op.
class BufferView {
 public:
  BufferView(py::handle obj, bool writable) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) throw py::error_already_set();
    held_ = true;
  }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  ~BufferView() {
    if (held_) {
      py::gil_scoped_acquire gil;
      PyBuffer_Release(&view_);
    }
  }
  void* data() const { return view_.buf; }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

double toSeconds(std::optional<double> timeout) { return timeout.has_value() ? *timeout : -1.0; }

// The options every collective over a buffer of `dtype` elements shares.
AllReduceOptions bufferOptions(const BufferView& in, void* outPtr, DType dtype, ReduceOp op, uint64_t tag,
                               uint64_t seq, std::optional<double> timeout, size_t segmentBytes) {
  const size_t esize = elementSize(dtype);
  if (in.size() % esize != 0) throw InvalidArgument("buffer size is not a multiple of the element size");
  AllReduceOptions o;
  o.input = in.data();
  o.output = outPtr;
  o.count = in.size() / esize;
  o.dtype = dtype;
  o.op = op;
  o.tag = tag;
  o.seq = seq;
  o.timeoutSeconds = toSeconds(timeout);
  o.segmentBytes = segmentBytes;
  return o;
}

// What every op handle does: wait (GIL released), raise the op's error, abort.
class OpHandle {
 public:
  OpHandle(std::shared_ptr<Engine> engine, std::shared_ptr<Collective> op)
      : engine_(std::move(engine)), op_(std::move(op)) {}

  bool wait(std::optional<double> timeout) {
    py::gil_scoped_release release;
    return op_->wait(toSeconds(timeout));
  }

  void result(std::optional<double> timeout) {
    bool finished;
    {
      py::gil_scoped_release release;
      finished = op_->wait(toSeconds(timeout));
    }
    if (!finished) throw TimeoutError("wait timed out; the op is still running");
    op_->rethrow();
  }

  bool done() const { return op_->done(); }
  void abort(const std::string& reason, const std::vector<uint64_t>& keepIdleTo) {
    engine_->abort(op_, reason, keepIdleTo);
  }

 protected:
  // The engine may still write into the caller's buffers: stop it before they go.
  void stopIfRunning() {
    if (!op_->done()) {
      engine_->abort(op_, "handle dropped before the op finished");
      op_->wait(-1);
    }
  }

  std::shared_ptr<Engine> engine_;
  std::shared_ptr<Collective> op_;
};

class AllReduceHandle : public OpHandle {
 public:
  AllReduceHandle(std::shared_ptr<Engine> engine, std::shared_ptr<Collective> op,
                  std::unique_ptr<BufferView> input, std::unique_ptr<BufferView> output)
      : OpHandle(std::move(engine), std::move(op)), input_(std::move(input)), output_(std::move(output)) {}

  ~AllReduceHandle() {
    py::gil_scoped_release release;
    stopIfRunning();
    engine_->settle(op_, /*commit=*/false);
  }

  void settle(bool commit) {
    py::gil_scoped_release release;
    engine_->settle(op_, commit);
  }
  uint64_t txBytes() const { return op_->txBytes(); }
  uint64_t rxBytes() const { return op_->rxBytes(); }
  bool voted() const { return op_->voted(); }
  std::tuple<uint64_t, uint64_t, uint64_t> key() const {
    const OpKey& k = op_->key();
    return {k.epoch, k.tag, k.seq};
  }

 private:
  std::unique_ptr<BufferView> input_;
  std::unique_ptr<BufferView> output_;
};

// Exposed shared state: holds the buffers until close() (or destruction) withdraws them.
class StateExposure {
 public:
  StateExposure(std::shared_ptr<Engine> engine, uint64_t id, std::vector<std::unique_ptr<BufferView>> views)
      : engine_(std::move(engine)), id_(id), views_(std::move(views)) {}
  ~StateExposure() {
    py::gil_scoped_release release;
    closeNoGil();
  }
  uint64_t close() {
    py::gil_scoped_release release;
    return closeNoGil();
  }
  uint64_t id() const { return id_; }

 private:
  uint64_t closeNoGil() {
    if (open_) {
      open_ = false;
      served_ = engine_->unexposeState(id_);
    }
    return served_;
  }
  std::shared_ptr<Engine> engine_;
  uint64_t id_;
  std::vector<std::unique_ptr<BufferView>> views_;
  bool open_ = true;
  uint64_t served_ = 0;
};

class FetchHandle : public OpHandle {
 public:
  FetchHandle(std::shared_ptr<Engine> engine, std::shared_ptr<StateFetch> op, std::vector<std::unique_ptr<BufferView>> views)
      : OpHandle(std::move(engine), op), fetch_(std::move(op)), views_(std::move(views)) {}
  ~FetchHandle() {
    py::gil_scoped_release release;
    stopIfRunning();
  }
  uint64_t rxBytes() const { return op_->done() ? op_->rxBytes() : op_->rxSoFar(); }
  uint64_t source() const { return fetch_->source(); }

 private:
  std::shared_ptr<StateFetch> fetch_;
  std::vector<std::unique_ptr<BufferView>> views_;
};

// A point-to-point op (Engine::sendTo / recvFrom): holds its buffer until it ends; a
// handle dropped while the op runs aborts it first.
class P2PHandle : public OpHandle {
 public:
  P2PHandle(std::shared_ptr<Engine> engine, std::shared_ptr<PointToPoint> op, std::unique_ptr<BufferView> view)
      : OpHandle(std::move(engine), op), p2p_(std::move(op)), view_(std::move(view)) {}
  ~P2PHandle() {
    py::gil_scoped_release release;
    stopIfRunning();
  }
  std::optional<uint64_t> peer() const {
    const uint64_t p = p2p_->peer();
    return p == kNoPeer ? std::nullopt : std::optional<uint64_t>(p);
  }
  uint64_t nbytes() const { return p2p_->bytes(); }
  uint64_t tag() const { return p2p_->userTag(); }
  uint64_t epoch() const { return p2p_->key().epoch; }
  uint64_t txBytes() const { return op_->txBytes(); }
  uint64_t rxBytes() const { return op_->done() ? op_->rxBytes() : op_->rxSoFar(); }

 private:
  std::shared_ptr<PointToPoint> p2p_;
  std::unique_ptr<BufferView> view_;
};

void raise(const char* className, const std::string& message, std::optional<uint64_t> peer) {
  py::object errors = py::module_::import("pccl_py.errors");
  py::object cls = errors.attr(className);
  py::object exc = peer.has_value() && *peer != kNoPeer ? cls(message, py::arg("peer") = *peer) : cls(message);
  PyErr_SetObject(cls.ptr(), exc.ptr());
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "pccl_py native data plane (private; use pccl_py.Communicator)";
  m.attr("PROTOCOL_VERSION") = kProtocolVersion;
  m.attr("MAX_FRAME_PAYLOAD") = kMaxFramePayload;
  m.attr("HELLO_MAGIC") = kHelloMagic;
  m.attr("FRAME_MAGIC") = kFrameMagic;
  m.attr("FRAME_TYPE_GOODBYE") = static_cast<int>(FrameType::kGoodbye);
  m.attr("HELLO_SIZE") = sizeof(Hello);
  m.attr("HELLO_ACK_SIZE") = sizeof(HelloAck);
  m.attr("HELLO_AUTH") = kHelloAuth;
  m.attr("HELLO_STATUS_AUTH_FAILED") = static_cast<uint32_t>(HelloStatus::kAuthFailed);
  m.attr("AUTH_PROOF_SIZE") = sizeof(AuthProof);
  m.attr("AUTH_RESULT_SIZE") = sizeof(AuthResult);
  m.attr("FRAME_HEADER_SIZE") = sizeof(FrameHeader);
  // The layouts of wire.hpp in struct notation and the MAC labels, for pccl_py's own
  // codec of the handshake (checked against these by a test).
  m.attr("HELLO_STATUS_OK") = static_cast<uint32_t>(HelloStatus::kOk);
  m.attr("NONCE_BYTES") = kNonceBytes;
  m.attr("MAC_BYTES") = kMacBytes;
  m.attr("HELLO_FORMAT") = kHelloFormat;
  m.attr("HELLO_ACK_FORMAT") = kHelloAckFormat;
  m.attr("AUTH_PROOF_FORMAT") = kAuthProofFormat;
  m.attr("AUTH_RESULT_FORMAT") = kAuthResultFormat;
  m.attr("HANDSHAKE_TRANSCRIPT_FORMAT") = kHandshakeTranscriptFormat;
  m.attr("HANDSHAKE_CONNECTOR_LABEL") = py::bytes(kConnectorLabel);
  m.attr("HANDSHAKE_ACCEPTOR_LABEL") = py::bytes(kAcceptorLabel);
  m.attr("FRAME_HEADER_FORMAT") = kFrameHeaderFormat;
  m.attr("STATE_REQUEST_FORMAT") = kStateRequestFormat;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const PeerLostError& e) {
      raise(errorKindName(ErrorKind::kPeerLost), e.what(), e.peer());
    } catch (const TimeoutError& e) {
      raise(errorKindName(ErrorKind::kTimeout), e.what(), std::nullopt);
    } catch (const AbortedError& e) {
      raise(errorKindName(ErrorKind::kAborted), e.what(), std::nullopt);
    } catch (const ProtocolError& e) {
      raise(errorKindName(ErrorKind::kProtocol), e.what(), e.peer());
    } catch (const AuthError& e) {
      raise("AuthError", e.what(), e.peer());
    } catch (const InvalidArgument& e) {
      raise(errorKindName(ErrorKind::kInvalid), e.what(), std::nullopt);
    } catch (const Error& e) {
      raise("PcclError", e.what(), std::nullopt);
    }
  });

  // Why an op failed; each name is the pccl_py FailureKind member it maps onto, and
  // error_kind_name() its value (the error class raised for it).
  py::enum_<ErrorKind>(m, "ErrorKind")
      .value("NONE", ErrorKind::kNone)
      .value("PEER_LOST", ErrorKind::kPeerLost)
      .value("TIMEOUT", ErrorKind::kTimeout)
      .value("ABORTED", ErrorKind::kAborted)
      .value("PROTOCOL", ErrorKind::kProtocol)
      .value("INVALID_ARGUMENT", ErrorKind::kInvalid);
  m.def(
      "error_kind_name", [](ErrorKind kind) { return std::string(errorKindName(kind)); }, py::arg("kind"),
      "The stable name of a native error kind: its pccl_py FailureKind value and error class (\"\" for NONE).");

  py::enum_<DType>(m, "DataType")
      .value("FLOAT16", DType::kFloat16)
      .value("BFLOAT16", DType::kBFloat16)
      .value("FLOAT32", DType::kFloat32)
      .value("FLOAT64", DType::kFloat64)
      .value("INT8", DType::kInt8)
      .value("INT16", DType::kInt16)
      .value("INT32", DType::kInt32)
      .value("INT64", DType::kInt64)
      .value("UINT8", DType::kUInt8)
      .value("UINT16", DType::kUInt16)
      .value("UINT32", DType::kUInt32)
      .value("UINT64", DType::kUInt64);

  py::enum_<ReduceOp>(m, "ReduceOp")
      .value("SUM", ReduceOp::kSum)
      .value("AVG", ReduceOp::kAvg)
      .value("PROD", ReduceOp::kProd)
      .value("MIN", ReduceOp::kMin)
      .value("MAX", ReduceOp::kMax);

#ifdef PCCL_WITH_CUDA
  m.attr("CUDA_BUILT") = true;
  m.def("cuda_available", &cuda::available, "Whether the CUDA kernels can run here (a device is visible).");
  m.def(
      "cuda_quantize",
      [](QuantKind kind, DType wire, DType dtype, uintptr_t src, size_t count, uintptr_t dst) {
        py::gil_scoped_release release;
        cuda::quantize(QuantSpec{kind, wire}, dtype, reinterpret_cast<const void*>(src), count,
                       reinterpret_cast<uint8_t*>(dst));
      },
      py::arg("kind"), py::arg("wire"), py::arg("dtype"), py::arg("src"), py::arg("count"), py::arg("dst"),
      "Encode `count` elements at device address src into device address dst (synchronous).");
  m.def(
      "cuda_dequantize",
      [](QuantKind kind, DType wire, DType dtype, uintptr_t src, size_t count, uintptr_t dst) {
        py::gil_scoped_release release;
        cuda::dequantize(QuantSpec{kind, wire}, dtype, reinterpret_cast<const uint8_t*>(src), count,
                         reinterpret_cast<void*>(dst));
      },
      py::arg("kind"), py::arg("wire"), py::arg("dtype"), py::arg("src"), py::arg("count"), py::arg("dst"),
      "Decode an encoded run at device address src into `count` elements at dst (synchronous).");
#else
  m.attr("CUDA_BUILT") = false;
  m.def("cuda_available", [] { return false; }, "Whether the CUDA kernels can run here (never: built without nvcc).");
#endif

  py::enum_<AllReduceAlgorithm>(m, "AllReduceAlgorithm")
      .value("RING", AllReduceAlgorithm::kRing)
      .value("DIRECT", AllReduceAlgorithm::kDirect)
      .value("DIRECT_RSAG", AllReduceAlgorithm::kDirectRsAg);

  py::enum_<CollectiveKind>(m, "CollectiveKind")
      .value("ALL_GATHER", CollectiveKind::kAllGather)
      .value("REDUCE_SCATTER", CollectiveKind::kReduceScatter)
      .value("BROADCAST", CollectiveKind::kBroadcast)
      .value("BROADCAST_DIRECT", CollectiveKind::kBroadcastDirect)
      .value("ALL_TO_ALL", CollectiveKind::kAllToAll);

  py::enum_<QuantKind>(m, "QuantKind")
      .value("NONE", QuantKind::kNone)
      .value("MINMAX", QuantKind::kMinMax)
      .value("ZEROPOINT", QuantKind::kZeroPoint);

  m.def("element_size", [](DType d) { return elementSize(d); });
  m.def(
      "hmac_sha256",
      [](const py::bytes& key, const py::bytes& data) {
        std::string k = key, d = data;
        Digest256 mac = hmacSha256(k, d.data(), d.size());
        return py::bytes(reinterpret_cast<const char*>(mac.data()), mac.size());
      },
      py::arg("key"), py::arg("data"), "HMAC-SHA256 as the handshake computes it (for tests).");
  m.def(
      "populate",
      [](py::object buffer) {
        BufferView view(buffer, /*writable=*/true);
        py::gil_scoped_release release;
        return populateWritable(view.data(), view.size());
      },
      py::arg("buffer"),
      "Fault the buffer's pages in writable without changing a byte, as the engine does ahead of a\n"
      "receive (MADV_POPULATE_WRITE); False when the kernel cannot (for tests).");
  m.def(
      "prefault",
      [](py::object buffer) {
        BufferView view(buffer, /*writable=*/true);
        py::gil_scoped_release release;
        return prefaultNow({MemoryRange{static_cast<uint8_t*>(view.data()), view.size()}}, PrefaultOptions{});
      },
      py::arg("buffer"),
      "Make the buffer's pages resident ahead of bytes that will land in it, as the engine does ahead\n"
      "of a receive (huge-page advice where nothing is mapped, then MADV_POPULATE_WRITE where cheap),\n"
      "without changing a byte; blocks, without the GIL. Returns the bytes populated (0 where the\n"
      "kernel cannot, or for buffers under 4 MiB).");
  m.def(
      "quant_encoded_bytes",
      [](QuantKind kind, DType wire, DType dtype, size_t count) {
        QuantSpec spec{kind, wire};
        checkQuantizable(spec, dtype);
        return quantEncodedBytes(spec, dtype, count);
      },
      py::arg("kind"), py::arg("wire"), py::arg("dtype"), py::arg("count"),
      "Bytes of `count` elements of `dtype` quantized to `wire` (uint8/uint16) by `kind`.");
  m.def(
      "quantize",
      [](QuantKind kind, DType wire, DType dtype, py::object src, py::object dst) {
        QuantSpec spec{kind, wire};
        checkQuantizable(spec, dtype);
        BufferView in(src, false);
        BufferView out(dst, true);
        const size_t count = in.size() / elementSize(dtype);
        if (in.size() % elementSize(dtype) != 0 || out.size() != quantEncodedBytes(spec, dtype, count)) {
          throw InvalidArgument("buffer sizes do not match the encoding");
        }
        py::gil_scoped_release release;
        quantize(spec, dtype, in.data(), count, static_cast<uint8_t*>(out.data()));
      },
      py::arg("kind"), py::arg("wire"), py::arg("dtype"), py::arg("src"), py::arg("dst"),
      "Encode src (elements of dtype) into dst (quant_encoded_bytes bytes), as the all-reduce does.");
  m.def(
      "dequantize",
      [](QuantKind kind, DType wire, DType dtype, py::object src, py::object dst) {
        QuantSpec spec{kind, wire};
        checkQuantizable(spec, dtype);
        BufferView in(src, false);
        BufferView out(dst, true);
        const size_t count = out.size() / elementSize(dtype);
        if (out.size() % elementSize(dtype) != 0 || in.size() != quantEncodedBytes(spec, dtype, count)) {
          throw InvalidArgument("buffer sizes do not match the encoding");
        }
        py::gil_scoped_release release;
        dequantize(spec, dtype, static_cast<const uint8_t*>(in.data()), count, out.data());
      },
      py::arg("kind"), py::arg("wire"), py::arg("dtype"), py::arg("src"), py::arg("dst"),
      "Decode src (an encoded run) into dst (elements of dtype).");

  py::class_<OpHandle>(m, "OpHandle")
      .def("wait", &OpHandle::wait, py::arg("timeout") = py::none(),
           "Block until the op finishes or `timeout` seconds pass; returns whether it finished.")
      .def("result", &OpHandle::result, py::arg("timeout") = py::none(),
           "Wait, then raise the op's error if it failed.")
      .def("done", &OpHandle::done)
      .def("abort", &OpHandle::abort, py::arg("reason") = "aborted by caller",
           py::arg("keep_idle_to") = std::vector<uint64_t>{},
           "Fails the op with Aborted (no-op once it ended). keep_idle_to: the peers of the epoch that\n"
           "replaces the op's; connections to them that hold nothing of the op stay open for it.");

  py::class_<AllReduceHandle, OpHandle>(m, "AllReduceHandle")
      .def("settle", &AllReduceHandle::settle, py::arg("commit"),
           "For defer_commit in-place ops: keep the result (commit=True; only an op that succeeded or voted\n"
           "has one) or put the input back.")
      .def_property_readonly("tx_bytes", &AllReduceHandle::txBytes)
      .def_property_readonly("rx_bytes", &AllReduceHandle::rxBytes)
      .def_property_readonly("key", &AllReduceHandle::key)
      .def_property_readonly("voted", &AllReduceHandle::voted,
                             "Whether this peer cast its commit vote (it held the complete result).");

  py::class_<P2PHandle, OpHandle>(m, "P2PHandle")
      .def_property_readonly("peer", &P2PHandle::peer,
                             "The other peer: the destination, the source, or (a receive from any peer) the\n"
                             "sender once matched (None until then).")
      .def_property_readonly("nbytes", &P2PHandle::nbytes)
      .def_property_readonly("tag", &P2PHandle::tag)
      .def_property_readonly("epoch", &P2PHandle::epoch)
      .def_property_readonly("tx_bytes", &P2PHandle::txBytes)
      .def_property_readonly("rx_bytes", &P2PHandle::rxBytes);

  py::class_<StateExposure>(m, "StateExposure")
      .def_property_readonly("id", &StateExposure::id)
      .def("close", &StateExposure::close, "Stop serving; returns the bytes served.");

  py::class_<FetchHandle, OpHandle>(m, "FetchHandle")
      .def_property_readonly("rx_bytes", &FetchHandle::rxBytes)
      .def_property_readonly("source", &FetchHandle::source);

  m.def("auto_pool_size", &autoPoolSize, py::arg("rtt_seconds"), py::arg("send_buffer_bytes"), py::arg("sharers"),
        "Connections per pool that connections_per_peer=0 gives a peer at this round trip, with this send\n"
        "buffer (SO_SNDBUF as the kernel reports it), when `sharers` pools open together for one epoch.");

  m.def("auto_pacing_rate", &autoPacingRate, py::arg("sharers"), py::arg("pool_size"),
        "The pacing cap (bytes/s, SO_MAX_PACING_RATE) of each connection of an auto-sized pool of\n"
        "`pool_size` opened with `sharers` pools; 0: not paced (a pool of one).");

  py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
      .def(py::init([](uint64_t peerId, const std::string& host, uint16_t port, int connectionsPerPeer,
                       size_t segmentBytes, int socketBufferBytes, size_t mailboxLimitBytes,
                       const py::bytes& secret, bool zeroCopy, bool prefault, bool sharedMemory,
                       size_t ringBytes, const std::string& congestionControl) {
             EngineOptions o;
             o.peerId = peerId;
             o.listenHost = host;
             o.listenPort = port;
             o.connectionsPerPeer = connectionsPerPeer;
             o.segmentBytes = segmentBytes;
             o.socket.bufferBytes = socketBufferBytes;
             o.socket.congestionControl = congestionControl;
             o.mailboxLimitBytes = mailboxLimitBytes;
             o.secret = secret;
             o.zeroCopySend = zeroCopy;
             o.prefault = prefault;
             o.sharedMemory = sharedMemory;
             o.ringBytes = ringBytes;
             return std::make_shared<Engine>(o);
           }),
           py::arg("peer_id"), py::arg("host") = "127.0.0.1", py::arg("port") = 0,
           py::arg("connections_per_peer") = 1, py::arg("segment_bytes") = 512 << 10,
           py::arg("socket_buffer_bytes") = 0, py::arg("mailbox_limit_bytes") = size_t(256) << 20,
           py::arg("secret") = py::bytes(), py::arg("zero_copy") = true, py::arg("prefault") = true,
           py::arg("shared_memory") = true, py::arg("ring_bytes") = size_t(8) << 20,
           py::arg("congestion_control") = "bbr")
      .def_property_readonly("port", &Engine::port)
      .def("pool_size", &Engine::poolSize, py::arg("peer"),
           "Connections per pool to `peer` (with connections_per_peer=0: what its round trip asked for; 0 before any).")
      .def_property_readonly("zero_copy_bytes", &Engine::zeroCopyBytes,
                             "Payload bytes sent by reference (vmsplice + splice) instead of copied.")
      .def_property_readonly("shared_memory_bytes", &Engine::sharedMemoryBytes,
                             "Payload bytes sent through shared-memory rings to peers on this host instead of TCP.")
      .def_property_readonly(
          "congestion_control", [](const Engine& e) { return e.transport().congestionControl; },
          "The TCP congestion control of this engine's data connections (the one asked for, or the host's default).")
      .def_property_readonly(
          "congestion_control_note", [](const Engine& e) { return e.transport().congestionNote; },
          "Why the congestion control asked for is not in use; empty when it is (or none was asked for).")
      .def_property_readonly(
          "send_buffer_max", [](const Engine& e) { return e.transport().sendBufferMax; },
          "The largest send buffer a data connection can have, in the kernel's bytes (about 2/3 carry payload).")
      .def_property_readonly(
          "recv_buffer_max", [](const Engine& e) { return e.transport().recvBufferMax; },
          "The largest receive buffer a data connection can have, in the kernel's bytes.")
      .def_property_readonly("connections_opened", &Engine::connectionsOpened,
                             "Outgoing data-plane connections opened so far (every pool, every epoch).")
      .def_property_readonly("connections_kept", &Engine::connectionsKept,
                             "Outgoing connections kept across a re-ring for the new epoch (confirmed by the peer).")
      .def_property_readonly("state_rx_bytes", &Engine::stateRxBytes,
                             "State bytes received so far (the payload of state-data frames).")
      .def_property_readonly("padding_rx_bytes", &Engine::paddingRxBytes,
                             "Padding bytes received so far (from peers' pools warming ahead of a join).")
      .def_property_readonly("padding_bytes", &Engine::paddingBytes,
                             "Padding bytes sent by pools warming ahead of their epoch (prepare).")
      .def_property_readonly("connect_seconds", &Engine::connectSeconds,
                             "Wall seconds callers waited for connection pools to open (connect + handshake).")
      .def_property_readonly("prefaulted_bytes", &Engine::prefaultedBytes,
                             "Bytes of receive destinations faulted in ahead of their payloads (prefault=True).")
      .def_property_readonly("peer_id", &Engine::peerId)
      .def(
          "set_ring",
          [](Engine& e, uint64_t epoch, const std::vector<std::tuple<uint64_t, std::string, uint16_t>>& ring,
             size_t rank, std::optional<double> timeout, bool connectAll) {
            std::vector<PeerAddress> peers;
            for (const auto& [id, host, port] : ring) peers.push_back(PeerAddress{id, host, port});
            py::gil_scoped_release release;
            e.setRing(epoch, peers, rank, toSeconds(timeout), connectAll);
          },
          py::arg("epoch"), py::arg("ring"), py::arg("rank"), py::arg("timeout") = py::none(),
          py::arg("connect_all") = false,
          "Install the ring of `epoch` ((peer_id, host, port) in ring order) and connect to the next peer "
          "(connect_all: to every peer of the ring, all at once).")
      .def(
          "all_reduce",
          [](const std::shared_ptr<Engine>& e, py::object input, py::object output, DType dtype, ReduceOp op,
             uint64_t tag, uint64_t seq, std::optional<double> timeout, std::optional<double> connectTimeout,
             size_t segmentBytes, bool deferCommit, QuantKind quantization, DType quantDType, bool vote,
             AllReduceAlgorithm algorithm) {
            auto in = std::make_unique<BufferView>(input, /*writable=*/input.is(output));
            std::unique_ptr<BufferView> out;
            void* outPtr = in->data();
            if (!input.is(output)) {
              out = std::make_unique<BufferView>(output, /*writable=*/true);
              if (out->size() != in->size()) throw InvalidArgument("output size differs from input size");
              outPtr = out->data();
            }
            AllReduceOptions o = bufferOptions(*in, outPtr, dtype, op, tag, seq, timeout, segmentBytes);
            o.deferCommit = deferCommit;
            o.vote = vote;
            o.quant = QuantSpec{quantization, quantDType};
            o.algorithm = algorithm;
            std::shared_ptr<Collective> ring;
            {
              py::gil_scoped_release release;
              ring = e->allReduce(o, connectTimeout.has_value() ? *connectTimeout : o.timeoutSeconds);
            }
            return std::make_unique<AllReduceHandle>(e, std::move(ring), std::move(in), std::move(out));
          },
          py::arg("input"), py::arg("output"), py::arg("dtype"), py::arg("op"), py::arg("tag") = 0,
          py::arg("seq") = 0, py::arg("timeout") = py::none(), py::arg("connect_timeout") = py::none(),
          py::arg("segment_bytes") = 0, py::arg("defer_commit") = false, py::arg("quantization") = QuantKind::kNone,
          py::arg("quant_dtype") = DType::kUInt8, py::arg("vote") = false,
          py::arg("algorithm") = AllReduceAlgorithm::kRing,
          "Start a ring all-reduce of `input` into `output` (the same object: in place). Returns a handle.\n"
          "quantization != NONE: quantized to quant_dtype (UINT8/UINT16), SUM/AVG of floats only.\n"
          "algorithm (unquantized only; every peer must pass the same): RING, or DIRECT (every peer sends\n"
          "its input to every other and reduces all N in rank order; the vote goes all-to-all), or\n"
          "DIRECT_RSAG (chunk c goes straight to rank c, which reduces the N contributions in rank order\n"
          "and sends the result to every other peer; all-to-all vote).\n"
          "vote: succeed only once every peer holds the result (commit vote); handle.voted tells whether\n"
          "a failed op had voted (then every peer may hold the result; settle(True) still commits it).\n"
          "A voting op (out of place, or in place with defer_commit) sends large payloads by reference:\n"
          "leave both buffers alone until it has ended (committed or settled). In place with defer_commit,\n"
          "a voting op that fails puts its input back at settle(False) (or when the handle is dropped).")
      .def(
          "all_to_all",
          [](const std::shared_ptr<Engine>& e, CollectiveKind kind, py::object input, py::object output, DType dtype,
             ReduceOp op, uint64_t tag, uint64_t seq, std::optional<double> timeout,
             std::optional<double> connectTimeout, size_t segmentBytes, bool vote, size_t root) {
            const bool same = input.is(output);
            auto in = std::make_unique<BufferView>(input, /*writable=*/same);
            std::unique_ptr<BufferView> out;
            void* outPtr = in->data();
            size_t outBytes = in->size();
            if (!same) {
              out = std::make_unique<BufferView>(output, /*writable=*/true);
              outPtr = out->data();
              outBytes = out->size();
            }
            AllReduceOptions o = bufferOptions(*in, outPtr, dtype, op, tag, seq, timeout, segmentBytes);
            o.vote = vote;
            o.root = root;
            std::shared_ptr<Collective> started;
            {
              py::gil_scoped_release release;
              started = e->allToAll(kind, o, outBytes, connectTimeout.has_value() ? *connectTimeout : o.timeoutSeconds);
            }
            return std::make_unique<AllReduceHandle>(e, std::move(started), std::move(in), std::move(out));
          },
          py::arg("kind"), py::arg("input"), py::arg("output"), py::arg("dtype"), py::arg("op") = ReduceOp::kSum,
          py::arg("tag") = 0, py::arg("seq") = 0, py::arg("timeout") = py::none(),
          py::arg("connect_timeout") = py::none(), py::arg("segment_bytes") = 0, py::arg("vote") = false,
          py::arg("root") = 0,
          "Start an all-gather, reduce-scatter, broadcast or all-to-all (kind) over every peer of the ring.\n"
          "Returns a handle.\n"
          "ALL_GATHER: output holds N x input, row r from rank r. REDUCE_SCATTER: output holds this rank's\n"
          "chunk of the input's reduction by `op` (the ring's N chunks, the first count % N one element\n"
          "larger), reduced in rank order. BROADCAST (root scatters, owners pass on) / BROADCAST_DIRECT (root\n"
          "sends everything): rank `root`'s input lands in every other rank's output (pass one buffer as both\n"
          "for in place). ALL_TO_ALL: the input holds N equal blocks (count a multiple of N), block d goes to\n"
          "rank d; row s of the output (as large as the input; one buffer as both for in place) is rank s's\n"
          "block r. Every peer must pass the same kind, count, dtype, op and root (else ProtocolError).\n"
          "vote: succeed only once every peer holds its result (all-to-all commit vote). A failed op leaves\n"
          "the input intact and the output undefined.")
      .def(
          "send",
          [](const std::shared_ptr<Engine>& e, py::object buffer, uint64_t peer, uint64_t tag,
             std::optional<double> timeout, std::optional<double> connectTimeout) {
            auto view = std::make_unique<BufferView>(buffer, /*writable=*/false);
            std::shared_ptr<PointToPoint> op;
            {
              py::gil_scoped_release release;
              op = e->sendTo(peer, tag, view->data(), view->size(), toSeconds(timeout),
                             connectTimeout.has_value() ? *connectTimeout : toSeconds(timeout));
            }
            return std::make_unique<P2PHandle>(e, std::move(op), std::move(view));
          },
          py::arg("buffer"), py::arg("peer"), py::arg("tag") = 0, py::arg("timeout") = py::none(),
          py::arg("connect_timeout") = py::none(),
          "Send the bytes of `buffer` to `peer` (of the current ring) with a 64-bit user tag. Returns a\n"
          "P2PHandle; the k-th send to a peer with a tag matches its k-th receive from this peer with that\n"
          "tag. Succeeds once the receiver took the offer and every byte is with the kernel; fails with\n"
          "PeerLost / Timeout / Aborted, or ProtocolError when the receive's size differs. Leave the\n"
          "buffer alone until the handle is done.")
      .def(
          "recv",
          [](const std::shared_ptr<Engine>& e, py::object buffer, std::optional<uint64_t> peer, uint64_t tag,
             std::optional<double> timeout, std::optional<double> connectTimeout) {
            auto view = std::make_unique<BufferView>(buffer, /*writable=*/true);
            std::shared_ptr<PointToPoint> op;
            {
              py::gil_scoped_release release;
              op = e->recvFrom(peer.value_or(kNoPeer), tag, view->data(), view->size(), toSeconds(timeout),
                               connectTimeout.has_value() ? *connectTimeout : toSeconds(timeout));
            }
            return std::make_unique<P2PHandle>(e, std::move(op), std::move(view));
          },
          py::arg("buffer"), py::arg("peer") = py::none(), py::arg("tag") = 0, py::arg("timeout") = py::none(),
          py::arg("connect_timeout") = py::none(),
          "Receive exactly len(buffer) bytes from `peer` (None: from any peer of the ring) with `tag`.\n"
          "Returns a P2PHandle whose .peer names the sender once matched. Fails with PeerLost / Timeout /\n"
          "Aborted, or ProtocolError when the matched send's size differs (neither side is poisoned then).")
      .def(
          "disconnect", [](Engine& e, uint64_t peer, const std::string& reason) { e.disconnect(peer, reason); },
          py::arg("peer"), py::arg("reason") = "disconnected by caller")
      .def(
          "next_event",
          [](Engine& e, std::optional<double> timeout) -> py::object {
            Event ev;
            bool got;
            {
              py::gil_scoped_release release;
              got = e.nextEvent(&ev, toSeconds(timeout));
            }
            if (!got) return py::none();
            return py::make_tuple("peer_disconnected", ev.peer, ev.reason);
          },
          py::arg("timeout") = py::none())
      .def("live_connections", &Engine::liveConnections, py::arg("peer"), py::arg("epoch"))
      .def("state_round_trip", &Engine::stateRoundTrip, py::arg("source"), py::call_guard<py::gil_scoped_release>(),
           "Seconds: the smallest round trip any connection to `source` has measured (0: none).")
      .def("clamp_state_windows", &Engine::clampStateWindows, py::arg("sources"), py::arg("window_bytes"),
           py::arg("starting") = false, py::call_guard<py::gil_scoped_release>(),
           "Bound the receive windows of the state-transfer connections to `sources` to about `window_bytes` "
           "together (TCP_WINDOW_CLAMP, each its share: of those that carried bytes since the last call, or with "
           "`starting` (a fetch starts) of those that ever carried state, all if none has); returns the "
           "connections clamped.")
      .def(
          "expose_state",
          [](const std::shared_ptr<Engine>& e, const py::list& buffers) {
            std::vector<std::unique_ptr<BufferView>> views;
            std::vector<StateRegion> regions;
            for (py::handle b : buffers) {
              views.push_back(std::make_unique<BufferView>(b, /*writable=*/false));
              regions.push_back(StateRegion{static_cast<const uint8_t*>(views.back()->data()), views.back()->size()});
            }
            uint64_t id;
            {
              py::gil_scoped_release release;
              id = e->exposeState(std::move(regions));
            }
            return std::make_unique<StateExposure>(e, id, std::move(views));
          },
          py::arg("buffers"), "Serve these buffers (entry i = buffers[i]) to fetching peers until close().")
      .def(
          "prepare",
          [](Engine& e, const std::vector<std::tuple<uint64_t, std::string, uint16_t>>& peers, uint64_t epoch,
             size_t sharers, std::optional<double> timeout, double warmSeconds, uint64_t warmBytes,
             double warmMinRtt) {
            std::vector<PeerAddress> targets;
            for (const auto& [peer, host, port] : peers) targets.push_back(PeerAddress{peer, host, port});
            py::gil_scoped_release release;
            e.prepare(targets, epoch, sharers, toSeconds(timeout), warmSeconds, warmBytes, warmMinRtt);
          },
          py::arg("peers"), py::arg("epoch"), py::arg("sharers"), py::arg("timeout") = py::none(),
          py::arg("warm_seconds") = 0.0, py::arg("warm_bytes") = 0, py::arg("warm_min_rtt") = 0.0,
          "Open pools of `epoch` to (peer, host, port) ahead of the epoch that needs them (a join), then, where "
          "a connection's round trip is warm_min_rtt or more, send padding for up to warm_seconds / warm_bytes "
          "until TCP leaves slow start or the connection carries an op's first frame.")
      .def(
          "connect_state_sources",
          [](Engine& e, const std::vector<std::tuple<uint64_t, std::string, uint16_t>>& sources,
             std::optional<double> timeout) {
            std::vector<PeerAddress> targets;
            for (const auto& [peer, host, port] : sources) targets.push_back(PeerAddress{peer, host, port});
            py::gil_scoped_release release;
            e.connectStateSources(targets, toSeconds(timeout));
          },
          py::arg("sources"), py::arg("timeout") = py::none(),
          "Open the state-transfer connections to every (peer, host, port) at once (before fetch_state).")
      .def(
          "fetch_state",
          [](const std::shared_ptr<Engine>& e, uint64_t sourceId, const std::string& host, uint16_t port,
             uint64_t exposure, const py::list& dsts,
             const std::vector<std::tuple<uint32_t, uint64_t, uint64_t, size_t, uint64_t>>& chunks,
             std::optional<double> timeout) {
            std::vector<std::unique_ptr<BufferView>> views;
            for (py::handle d : dsts) views.push_back(std::make_unique<BufferView>(d, /*writable=*/true));
            std::vector<FetchChunk> plan;
            for (const auto& [entry, offset, length, dst, dstOffset] : chunks) {
              if (dst >= views.size() || dstOffset > views[dst]->size() || length > views[dst]->size() - dstOffset) {
                throw InvalidArgument("fetch chunk does not fit its destination buffer");
              }
              plan.push_back(FetchChunk{entry, offset, length, static_cast<uint8_t*>(views[dst]->data()) + dstOffset});
            }
            std::shared_ptr<StateFetch> op;
            {
              py::gil_scoped_release release;
              op = e->fetchState(PeerAddress{sourceId, host, port}, exposure, std::move(plan), toSeconds(timeout));
            }
            return std::make_unique<FetchHandle>(e, std::move(op), std::move(views));
          },
          py::arg("source"), py::arg("host"), py::arg("port"), py::arg("exposure"), py::arg("dsts"),
          py::arg("chunks"), py::arg("timeout") = py::none(),
          "Fetch (entry, offset, length, dst index, dst offset) chunks of a peer's exposure into dsts.")
      .def(
          "inject_fault", [](Engine& e, const std::string& kind, int count) { e.injectFault(kind, count); },
          py::arg("kind"), py::arg("count") = 1, "Test-only: 'corrupt_state' flips a byte in the next served chunks; 'withhold_vote': the\n"
          "next voting ops cast their commit vote without sending it.")
      .def("close", [](Engine& e) {
        py::gil_scoped_release release;
        e.close();
      });

  // The WAN emulator's packet relay (pccl_py.tools.wan drives it).
  py::class_<WanRelay>(m, "WanRelay")
      .def(py::init([](const std::vector<int>& tunFds, const std::vector<uint32_t>& addresses, uint64_t seed,
                       size_t maxPendingBytes) {
             return std::make_unique<WanRelay>(tunFds, addresses, WanLink{}, seed, maxPendingBytes);
           }),
           py::arg("tun_fds"), py::arg("addresses"), py::arg("seed") = 0,
           py::arg("max_pending_bytes") = size_t(512) << 20,
           "Relay between TUN fds (dup'ed: the caller closes its own); addresses[i] is host i's IPv4\n"
           "address as an integer. Links start unlimited with no delay; start() runs the thread.")
      .def("start", &WanRelay::start)
      .def("close", &WanRelay::stop, py::call_guard<py::gil_scoped_release>(),
           "Stop the relay thread and drop what is pending (idempotent).")
      .def_property_readonly("hosts", &WanRelay::hosts)
      .def(
          "set_link",
          [](WanRelay& r, size_t src, size_t dst, double delay, double jitter, uint64_t rateBits, double loss,
             double queue) { r.setLink(src, dst, WanLink{delay, jitter, rateBits, loss, queue}); },
          py::arg("src"), py::arg("dst"), py::arg("delay_s"), py::arg("jitter_s") = 0.0, py::arg("rate_bits") = 0,
          py::arg("loss") = 0.0, py::arg("queue_s") = 0.05,
          "Set the directed link src->dst (one-way delay; rate 0: unlimited); applies to packets entering it next.")
      .def(
          "link",
          [](const WanRelay& r, size_t src, size_t dst) {
            WanLink l = r.link(src, dst);
            return py::make_tuple(l.delaySeconds, l.jitterSeconds, l.rateBits, l.loss, l.queueSeconds);
          },
          py::arg("src"), py::arg("dst"), "(delay_s, jitter_s, rate_bits, loss, queue_s) of link src->dst.")
      .def(
          "set_host",
          [](WanRelay& r, size_t host, uint64_t upBits, uint64_t downBits, double upQueue, double downQueue) {
            r.setHost(host, WanHost{upBits, downBits, upQueue, downQueue});
          },
          py::arg("host"), py::arg("up_bits") = 0, py::arg("down_bits") = 0, py::arg("up_queue_s") = 0.05,
          py::arg("down_queue_s") = 0.05,
          "Set host's access link: its uplink and downlink rates (bits/s, 0: unlimited), shared by all its\n"
          "pairs, each with a drop-tail queue (seconds at its rate); applies to packets entering them next.")
      .def(
          "host",
          [](const WanRelay& r, size_t host) {
            WanHost h = r.host(host);
            return py::make_tuple(h.upBits, h.downBits, h.upQueueSeconds, h.downQueueSeconds);
          },
          py::arg("host"), "(up_bits, down_bits, up_queue_s, down_queue_s) of host's access link.")
      .def("set_partitioned", &WanRelay::setPartitioned, py::arg("host"), py::arg("on"),
           "Cut (or heal) every link to and from `host`: its packets vanish silently.")
      .def("set_link_partitioned", &WanRelay::setLinkPartitioned, py::arg("src"), py::arg("dst"), py::arg("on"))
      .def(
          "stats",
          [](const WanRelay& r) {
            WanRelayStats s = r.stats();
            py::list links;
            for (size_t i = 0; i < s.links.size(); ++i) {
              const WanLinkStats& l = s.links[i];
              py::dict d;
              d["src"] = i / r.hosts();
              d["dst"] = i % r.hosts();
              d["packets"] = l.packets;
              d["bytes"] = l.bytes;
              d["dropped_partition"] = l.droppedPartition;
              d["dropped_loss"] = l.droppedLoss;
              d["dropped_queue"] = l.droppedQueue;
              d["dropped_memory"] = l.droppedMemory;
              d["write_errors"] = l.writeErrors;
              links.append(d);
            }
            py::list hosts;
            for (size_t i = 0; i < s.hosts.size(); ++i) {
              py::dict d;
              d["host"] = i;
              d["dropped_up_queue"] = s.hosts[i].droppedUpQueue;
              d["dropped_down_queue"] = s.hosts[i].droppedDownQueue;
              hosts.append(d);
            }
            py::dict out;
            out["links"] = links;
            out["hosts"] = hosts;
            out["unroutable"] = s.unroutable;
            out["pending_packets"] = s.pendingPackets;
            out["pending_bytes"] = s.pendingBytes;
            out["error"] = s.error;
            return out;
          },
          "Per directed link: packets/bytes forwarded and drops by cause; per host: its access link's\n"
          "queue drops; relay-wide counters.");
}
