package conveyor

// The wire Value <-> Go values; interoperates with sdk/python/conveyor/values.py and
// workers/node/lib/values.js.
//
//	Go                                    Value kind      decoded back as
//	nil                                   (empty)         nil
//	bool                                  bool_value      bool
//	int*, uint* (within int64)            int_value       int64
//	float32, float64                      double_value    float64
//	string                                string_value    string
//	[]byte                                bytes_value     []byte
//	json.RawMessage                       json_value      []any / map[string]any / nil
//	anything else (slices, maps, structs) json_value      []any / map[string]any
//
// Inside JSON, []byte held in slices and maps becomes {"$bytes": "<base64>"} (the form the
// server uses for chord results) and such objects decode back to []byte; numbers decode to
// int64 when integral, else float64.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"reflect"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
)

// bytesKey marks bytes inside JSON text.
const bytesKey = "$bytes"

// ToValue encodes one Go value as a Value.
func ToValue(x any) (*pb.Value, error) {
	if x == nil {
		return &pb.Value{}, nil
	}
	if raw, ok := x.(json.RawMessage); ok {
		if !json.Valid(raw) {
			return nil, fmt.Errorf("json.RawMessage is not valid JSON: %q", raw)
		}
		return &pb.Value{Kind: &pb.Value_JsonValue{JsonValue: string(raw)}}, nil
	}
	v := reflect.ValueOf(x)
	switch v.Kind() {
	case reflect.Bool:
		return &pb.Value{Kind: &pb.Value_BoolValue{BoolValue: v.Bool()}}, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return &pb.Value{Kind: &pb.Value_IntValue{IntValue: v.Int()}}, nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		if v.Uint() > math.MaxInt64 {
			return nil, fmt.Errorf("integer %d does not fit in int64", v.Uint())
		}
		return &pb.Value{Kind: &pb.Value_IntValue{IntValue: int64(v.Uint())}}, nil
	case reflect.Float32, reflect.Float64:
		return &pb.Value{Kind: &pb.Value_DoubleValue{DoubleValue: v.Float()}}, nil
	case reflect.String:
		return &pb.Value{Kind: &pb.Value_StringValue{StringValue: v.String()}}, nil
	case reflect.Pointer:
		if v.IsNil() {
			return &pb.Value{}, nil
		}
		return ToValue(v.Elem().Interface())
	}
	if isBytes(v) {
		return &pb.Value{Kind: &pb.Value_BytesValue{BytesValue: v.Bytes()}}, nil
	}
	text, err := json.Marshal(jsonSafe(v))
	if err != nil {
		return nil, fmt.Errorf("cannot encode %T as a task value: %w", x, err)
	}
	return &pb.Value{Kind: &pb.Value_JsonValue{JsonValue: string(text)}}, nil
}

// ToValues encodes a list of Go values.
func ToValues(xs []any) ([]*pb.Value, error) {
	out := make([]*pb.Value, len(xs))
	for i, x := range xs {
		value, err := ToValue(x)
		if err != nil {
			return nil, fmt.Errorf("arg %d: %w", i, err)
		}
		out[i] = value
	}
	return out, nil
}

// ToValueMap encodes named Go values.
func ToValueMap(xs map[string]any) (map[string]*pb.Value, error) {
	if len(xs) == 0 {
		return nil, nil
	}
	out := make(map[string]*pb.Value, len(xs))
	for key, x := range xs {
		value, err := ToValue(x)
		if err != nil {
			return nil, fmt.Errorf("kwarg %q: %w", key, err)
		}
		out[key] = value
	}
	return out, nil
}

func isBytes(v reflect.Value) bool {
	return v.Kind() == reflect.Slice && v.Type().Elem().Kind() == reflect.Uint8
}

// jsonSafe rewrites the []byte inside slices and maps as {"$bytes": base64}; encoding/json
// would write them as bare base64 strings, which other languages could not tell from text.
// Other values (structs among them) are left to encoding/json.
func jsonSafe(v reflect.Value) any {
	for v.Kind() == reflect.Interface || v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return nil
		}
		v = v.Elem()
	}
	switch {
	case isBytes(v):
		return map[string]string{bytesKey: base64.StdEncoding.EncodeToString(v.Bytes())}
	case v.Kind() == reflect.Slice || v.Kind() == reflect.Array:
		if v.Kind() == reflect.Slice && v.IsNil() {
			return nil
		}
		out := make([]any, v.Len())
		for i := range out {
			out[i] = jsonSafe(v.Index(i))
		}
		return out
	case v.Kind() == reflect.Map && v.Type().Key().Kind() == reflect.String:
		if v.IsNil() {
			return nil
		}
		out := make(map[string]any, v.Len())
		iter := v.MapRange()
		for iter.Next() {
			out[iter.Key().String()] = jsonSafe(iter.Value())
		}
		return out
	}
	return v.Interface()
}

// FromValue decodes one Value into its natural Go value (see the table above).
func FromValue(value *pb.Value) (any, error) {
	switch kind := value.GetKind().(type) {
	case nil:
		return nil, nil
	case *pb.Value_IntValue:
		return kind.IntValue, nil
	case *pb.Value_DoubleValue:
		return kind.DoubleValue, nil
	case *pb.Value_StringValue:
		return kind.StringValue, nil
	case *pb.Value_BoolValue:
		return kind.BoolValue, nil
	case *pb.Value_BytesValue:
		return kind.BytesValue, nil
	case *pb.Value_JsonValue:
		return decodeJSON(kind.JsonValue)
	default:
		return nil, fmt.Errorf("unknown Value kind %T", kind)
	}
}

// FromValues decodes a list of Values.
func FromValues(values []*pb.Value) ([]any, error) {
	out := make([]any, len(values))
	for i, value := range values {
		x, err := FromValue(value)
		if err != nil {
			return nil, fmt.Errorf("arg %d: %w", i, err)
		}
		out[i] = x
	}
	return out, nil
}

// FromValueMap decodes named Values.
func FromValueMap(values map[string]*pb.Value) (map[string]any, error) {
	out := make(map[string]any, len(values))
	for key, value := range values {
		x, err := FromValue(value)
		if err != nil {
			return nil, fmt.Errorf("kwarg %q: %w", key, err)
		}
		out[key] = x
	}
	return out, nil
}

func decodeJSON(text string) (any, error) {
	decoder := json.NewDecoder(bytes.NewReader([]byte(text)))
	decoder.UseNumber() // int64 stays exact
	var x any
	if err := decoder.Decode(&x); err != nil {
		return nil, fmt.Errorf("json_value is not valid JSON: %w", err)
	}
	return fromJSON(x)
}

func fromJSON(x any) (any, error) {
	switch v := x.(type) {
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i, nil
		}
		return v.Float64()
	case []any:
		for i, item := range v {
			decoded, err := fromJSON(item)
			if err != nil {
				return nil, err
			}
			v[i] = decoded
		}
		return v, nil
	case map[string]any:
		if encoded, ok := v[bytesKey].(string); ok && len(v) == 1 {
			return base64.StdEncoding.DecodeString(encoded)
		}
		for key, item := range v {
			decoded, err := fromJSON(item)
			if err != nil {
				return nil, err
			}
			v[key] = decoded
		}
		return v, nil
	}
	return x, nil
}

// DecodeValue decodes a Value into the Go value `out` points to: a scalar of any numeric kind
// (range-checked), a string, []byte, or, through encoding/json, a struct, slice or map.
func DecodeValue(value *pb.Value, out any) error {
	target := reflect.ValueOf(out)
	if target.Kind() != reflect.Pointer || target.IsNil() {
		return fmt.Errorf("DecodeValue needs a non-nil pointer, got %T", out)
	}
	decoded, err := decodeAs(value, target.Elem().Type())
	if err != nil {
		return err
	}
	target.Elem().Set(decoded)
	return nil
}

// decodeAs decodes a Value as a Go value of type t.
func decodeAs(value *pb.Value, t reflect.Type) (reflect.Value, error) {
	natural, err := FromValue(value)
	if err != nil {
		return reflect.Value{}, err
	}
	if natural == nil {
		return reflect.Zero(t), nil
	}
	got := reflect.ValueOf(natural)
	if got.Type().AssignableTo(t) {
		return got, nil
	}
	if converted, ok := convertNumber(got, t); ok {
		return converted, nil
	}
	if _, isJSON := value.GetKind().(*pb.Value_JsonValue); !isJSON && !isNumberKind(t.Kind()) &&
		t.Kind() != got.Kind() && t.Kind() != reflect.Interface {
		return reflect.Value{}, fmt.Errorf("cannot decode a %s as %s", got.Type(), t)
	}
	text, err := valueJSON(value)
	if err != nil {
		return reflect.Value{}, err
	}
	target := reflect.New(t)
	if err := json.Unmarshal(text, target.Interface()); err != nil {
		return reflect.Value{}, fmt.Errorf("cannot decode %s as %s: %w", text, t, err)
	}
	return target.Elem(), nil
}

// valueJSON is the JSON text of a Value (for decoding into structs and named types).
func valueJSON(value *pb.Value) ([]byte, error) {
	if kind, ok := value.GetKind().(*pb.Value_JsonValue); ok {
		return []byte(kind.JsonValue), nil
	}
	natural, err := FromValue(value)
	if err != nil {
		return nil, err
	}
	return json.Marshal(natural)
}

func isNumberKind(k reflect.Kind) bool {
	return (k >= reflect.Int && k <= reflect.Uint64) || k == reflect.Float32 || k == reflect.Float64
}

// convertNumber converts an int64 or float64 to another numeric type when no precision is
// lost (so 3.5 never becomes the int 3).
func convertNumber(got reflect.Value, t reflect.Type) (reflect.Value, bool) {
	if !isNumberKind(got.Kind()) || !isNumberKind(t.Kind()) {
		return reflect.Value{}, false
	}
	if t.Kind() >= reflect.Uint && t.Kind() <= reflect.Uint64 && got.Kind() == reflect.Int64 && got.Int() < 0 {
		return reflect.Value{}, false
	}
	converted := got.Convert(t)
	if converted.Convert(got.Type()).Interface() != got.Interface() {
		return reflect.Value{}, false
	}
	return converted, true
}
