package conveyor_test

import (
	"math"
	"reflect"
	"testing"

	"github.com/conveyor-dev/conveyor/sdk/go/conveyor"
	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
)

func TestBytesInsideStructuresUseTheSharedJSONForm(t *testing.T) {
	value, err := conveyor.ToValue(map[string]any{"data": []byte{1, 2}})
	if err != nil {
		t.Fatal(err)
	}
	if got := value.GetJsonValue(); got != `{"data":{"$bytes":"AQI="}}` {
		t.Errorf("json_value %s", got)
	}
	decoded, err := conveyor.FromValue(value)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(decoded, map[string]any{"data": []byte{1, 2}}) {
		t.Errorf("decoded %#v", decoded)
	}
}

func TestValuesThatDoNotFitAreRefused(t *testing.T) {
	if _, err := conveyor.ToValue(uint64(math.MaxUint64)); err == nil {
		t.Error("a uint64 past int64 was encoded")
	}
	if _, err := conveyor.ToValue(map[string]any{"x": math.NaN()}); err == nil {
		t.Error("NaN inside JSON was encoded")
	}
	var small int8
	if err := conveyor.DecodeValue(&pb.Value{Kind: &pb.Value_IntValue{IntValue: 300}}, &small); err == nil {
		t.Errorf("300 decoded into an int8 as %d", small)
	}
	var whole int
	if err := conveyor.DecodeValue(&pb.Value{Kind: &pb.Value_DoubleValue{DoubleValue: 3.5}}, &whole); err == nil {
		t.Errorf("3.5 decoded into an int as %d", whole)
	}
	var unsigned uint
	if err := conveyor.DecodeValue(&pb.Value{Kind: &pb.Value_IntValue{IntValue: -1}}, &unsigned); err == nil {
		t.Errorf("-1 decoded into a uint as %d", unsigned)
	}
	var text string
	if err := conveyor.DecodeValue(&pb.Value{Kind: &pb.Value_IntValue{IntValue: 1}}, &text); err == nil {
		t.Errorf("1 decoded into a string as %q", text)
	}
}

func TestIntegersStayExactInsideJSON(t *testing.T) {
	value, err := conveyor.ToValue([]int64{math.MaxInt64, -3})
	if err != nil {
		t.Fatal(err)
	}
	var back []int64
	if err := conveyor.DecodeValue(value, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, []int64{math.MaxInt64, -3}) {
		t.Errorf("decoded %v", back)
	}
	natural, _ := conveyor.FromValue(value)
	if !reflect.DeepEqual(natural, []any{int64(math.MaxInt64), int64(-3)}) {
		t.Errorf("natural %#v", natural)
	}
}

func TestRegisterRefusesWhatItCannotCall(t *testing.T) {
	worker := conveyor.NewWorker(conveyor.WorkerOptions{})
	for name, fn := range map[string]any{
		"not a function":  42,
		"three results":   func() (int, int, error) { return 0, 0, nil },
		"no error second": func() (int, int) { return 0, 0 },
	} {
		if err := worker.Register(name, fn); err == nil {
			t.Errorf("%s was registered", name)
		}
	}
	if err := worker.Register("ok", func() {}); err != nil {
		t.Fatal(err)
	}
	if err := worker.Register("ok", func() {}); err == nil {
		t.Error("a name was registered twice")
	}
}
